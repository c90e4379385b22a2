r"""`data_prep tokenizer`: train a lowercase WordPiece tokenizer on the text of shards.

    python -m data_prep tokenizer --shards runs/demo/data/captions runs/demo/data/vqa --vocab-size 1000 \
        --output runs/demo/tokenizer

The output folder loads with ``transformers.AutoTokenizer.from_pretrained(TOKDIR)`` as a
BertTokenizerFast: [PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4.
"""
from __future__ import annotations

import argparse
import os
from typing import Iterable, Iterator

from data_prep.shards import iter_tar_samples, manifest_shards, sample_texts

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def corpus_texts(shard_dirs: Iterable[str], splits: list[str] | None = None) -> Iterator[str]:
    """Every text of every listed shard (all splits unless `splits` is given)."""
    for out_dir in shard_dirs:
        for split, path in manifest_shards(out_dir):
            if splits and split not in splits:
                continue
            for _, fields in iter_tar_samples(path):
                yield from sample_texts(fields)


def train_wordpiece(texts: Iterable[str], vocab_size: int, min_frequency: int = 1):
    """A `tokenizers.Tokenizer`: BERT normaliser (lowercase), BERT pre-tokeniser, WordPiece, [CLS] A [SEP]."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True, clean_text=True, handle_chinese_chars=True,
                                                strip_accents=None)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                        special_tokens=SPECIAL_TOKENS, show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    tok.decoder = decoders.WordPiece(prefix="##")
    return tok


def save_hf_tokenizer(tok, out_dir: str, model_max_length: int = 512) -> None:
    """Save as a Hugging Face folder (tokenizer.json + configs) that AutoTokenizer loads."""
    from transformers import BertTokenizerFast

    hf = BertTokenizerFast(tokenizer_object=tok, do_lower_case=True, unk_token="[UNK]", sep_token="[SEP]",
                           pad_token="[PAD]", cls_token="[CLS]", mask_token="[MASK]",
                           model_max_length=model_max_length)
    os.makedirs(out_dir, exist_ok=True)
    hf.save_pretrained(out_dir)


def run(args: argparse.Namespace) -> int:
    tok = train_wordpiece(corpus_texts(args.shards, args.splits), args.vocab_size, args.min_frequency)
    for i, special in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(special) == i, (special, tok.token_to_id(special))
    save_hf_tokenizer(tok, args.output, args.model_max_length)
    print(f"data_prep tokenizer: vocabulary of {tok.get_vocab_size()} WordPiece tokens -> {args.output}")
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("tokenizer", help="train a WordPiece tokenizer on shard text",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", nargs="+", required=True, help="data_prep output folders (with manifest.json)")
    p.add_argument("--vocab-size", type=int, required=True, help="target vocabulary size, specials included")
    p.add_argument("--output", required=True, help="tokenizer folder to write")
    p.add_argument("--splits", nargs="*", default=None, help="only these splits (default: all)")
    p.add_argument("--min-frequency", type=int, default=1, help="minimum pair frequency (default %(default)s)")
    p.add_argument("--model-max-length", type=int, default=512, help="saved model_max_length")
    p.set_defaults(func=run)
