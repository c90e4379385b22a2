"""Predict with an exported model (``python -m pipeline.export``): VQA answers, classes, embeddings, retrieval,
captions. No DeepSpeed, no launcher, no run folder: only the export folder.

    python -m pipeline.predict --model exports/vqa --image cat.jpg --text "what colour is the cat?"
    python -m pipeline.predict --model exports/vqa --input questions.jsonl --output answers.jsonl --top-k 3
    python -m pipeline.predict --model exports/pretrain --mode embed --text "a red circle"
    python -m pipeline.predict --model exports/pretrain --mode retrieve --text "a red circle" --gallery images/
    python -m pipeline.predict --model exports/caption --mode caption --image cat.jpg --num-beams 3
    python -m pipeline.predict --model exports/esc50 --mode classify --audio dog.flac

JSONL input: one object per line, {"id": any, "image": path, "question" or "text": str, "audio": path}
(relative paths are relative to the JSONL's folder); the output has one object per line with its "id" (default:
the line number), in input order. A line whose image or audio cannot be decoded gets {"id", "error"} and the
rest go on; a missing file, a line that is not JSON or an input the mode cannot use stops before the model
loads (exit 2, naming the file and line).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Iterator

MODES = ("vqa", "classify", "embed", "retrieve", "caption")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
VQA_HEAD, LM_HEAD = "vqa", "mlm"
CONTRASTIVE = {"image": "itc", "audio": "atc"}  # the ITC-style head of each media modality (text: either)
MODALITY_KEYS = {"image": ("pixel_values",), "text": ("input_ids", "attention_mask"),
                 "audio": ("audio_values", "audio_lengths")}


class InputError(ValueError):
    """Bad user input (a file, a line, a mode the model cannot do): exit 2 with this message."""


def build_parser() -> argparse.ArgumentParser:
    doc = __doc__.split("\n\n")
    p = argparse.ArgumentParser(prog="python -m pipeline.predict", description=doc[0], epilog="\n\n".join(doc[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="export folder (python -m pipeline.export --output)")
    p.add_argument("--mode", choices=MODES, default=None,
                   help="default: retrieve with --gallery, else vqa with a VQA head, else classify with a labelled "
                        "classifier head, else embed with an ITC head, else caption with an LM head, else embed")
    one = p.add_argument_group("one input on the command line")
    one.add_argument("--image", help="image file")
    one.add_argument("--text", help="text: the question (vqa), the hypothesis (classify), a query (retrieve)")
    one.add_argument("--audio", help="audio file (any format soundfile reads; resampled to the model's rate)")
    one.add_argument("--id", default="0", help="id of the command-line input in the output")
    p.add_argument("--input", help="JSONL of inputs, one object per line (see below)")
    p.add_argument("--output", help="JSONL to write (default: stdout)")
    p.add_argument("--gallery", help="retrieve: a folder of images, or a JSONL of items (image, text or audio)")
    p.add_argument("--head", help="classify: the classifier head (default: the first with labels, not vqa)")
    p.add_argument("--top-k", type=int, default=5, help="answers / labels / matches per input")
    p.add_argument("--batch-size", type=int, default=None,
                   help="inputs per forward; every batch is padded to it with blank inputs, as pipeline.evaluate "
                        "does (MoE capacity depends on the batch). Default 32, 1 for a command-line input")
    p.add_argument("--generate", action="store_true", help="vqa: also generate each answer with the LM head")
    p.add_argument("--num-beams", type=int, default=1, help="caption / --generate: beam size (1 = greedy)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="caption / --generate: longest output, [SEP] included (default: text_len - 1 for a "
                        "caption, 4 for an answer)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    single = any(v is not None for v in (args.image, args.text, args.audio))
    if bool(args.input) == single:
        p.error("give either --input JSONL or one input (--image / --text / --audio), not both or neither")
    if args.top_k < 1 or (args.batch_size is not None and args.batch_size < 1) or args.num_beams < 1:
        p.error("--top-k, --batch-size and --num-beams must be >= 1")
    if args.mode == "retrieve" and not args.gallery:
        p.error("--mode retrieve needs --gallery")
    if args.batch_size is None:
        args.batch_size = 32 if args.input else 1
    return args


# ------------------------------------------------------------------------------------------------ inputs
def read_items(path: Path) -> list[dict[str, Any]]:
    """The JSONL's items, {"id", "image", "text", "audio", "where"} (paths made absolute); InputError naming
    the line that is not a JSON object or names a missing file."""
    if not path.is_file():
        raise InputError(f"--input {path}: no such file")
    items = []
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                obj = json.loads(line)
            except ValueError as exc:
                raise InputError(f"{where}: not valid JSON ({exc})") from None
            if not isinstance(obj, dict):
                raise InputError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            items.append(make_item(obj.get("id", number), obj.get("image"), obj.get("question", obj.get("text")),
                                   obj.get("audio"), where, path.parent))
    if not items:
        raise InputError(f"--input {path}: no items")
    return items


def make_item(item_id: Any, image: Any, text: Any, audio: Any, where: str, base: Path) -> dict[str, Any]:
    item: dict[str, Any] = {"id": item_id, "where": where}
    for key, value in (("image", image), ("audio", audio)):
        if value is None:
            continue
        file = base / str(value)
        if not file.is_file():
            raise InputError(f"{where}: {key} file {file} not found")
        item[key] = file
    if text is not None:
        if not isinstance(text, str) or not text.strip():
            raise InputError(f"{where}: text/question must be a non-empty string, got {text!r}")
        item["text"] = text
    if not any(key in item for key in ("image", "text", "audio")):
        raise InputError(f"{where}: no image, text/question or audio")
    return item


def read_gallery(spec: str) -> list[dict[str, Any]]:
    """A folder's image files (sorted, ids = file names) or a JSONL's items."""
    path = Path(spec)
    if path.is_dir():
        files = sorted(f for f in path.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise InputError(f"--gallery {path}: no image files ({', '.join(IMAGE_SUFFIXES)})")
        return [{"id": f.name, "image": f, "where": str(f)} for f in files]
    return read_items(path)


def modalities(item: dict[str, Any]) -> tuple[str, ...]:
    return tuple(m for m in ("image", "text", "audio") if m in item)


# ------------------------------------------------------------------------------------------------ model
def read_preprocessing(folder: Path) -> tuple[int, int]:
    """(image size, text length) of an export: its ``preprocessor_config.json`` is the one source of
    preprocessing (``pipeline.predict``, ``pipeline.explain``); InputError when it is missing or incomplete."""
    path = folder / "preprocessor_config.json"
    if not path.is_file():
        raise InputError(f"--model {folder}: no preprocessor_config.json (image size and text length; "
                         "python -m pipeline.export writes it)")
    try:
        pre = json.loads(path.read_text())
        return int(pre["image_size"]), int(pre["text_len"])
    except (ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{path}: needs integer image_size and text_len ({type(exc).__name__}: {exc})") from None


class Predictor:
    """An exported model with its tokenizer and preprocessing (training's: ``downstream_common``)."""

    def __init__(self, folder: Path, device: str = "cpu"):
        import torch

        from pipeline.hf.modeling import load_export

        self.torch = torch
        self.model, self.tokenizer = load_export(folder, device=device)
        self.device = torch.device(device)
        self.config = self.model.config
        self.image_size, self.text_len = read_preprocessing(folder)
        self.heads = dict(self.config.heads or {})
        self.label_maps = dict(self.config.label_maps or {})

    @property
    def body(self) -> Any:
        return self.model.model

    # preprocessing: exactly training's
    def prepare(self, item: dict[str, Any]) -> dict[str, Any]:
        """One item's tensors ({pixel_values [3, H, W], input_ids / attention_mask [L], audio_values [T, F],
        audio_lengths}); raises for an image / audio that cannot be decoded."""
        from pipeline.data.loader import decode_sample
        from pipeline.tasks.downstream_common import audio_tensor, image_tensor, tokenize

        out: dict[str, Any] = {}
        if "image" in item:
            image = decode_sample({"jpg": item["image"].read_bytes()}, ["jpg"])["jpg"]
            out["pixel_values"] = image_tensor(image, self.image_size)
        if "text" in item:
            ids, mask = tokenize(self.tokenizer, [item["text"]], self.text_len)
            out["input_ids"], out["attention_mask"] = ids[0], mask[0]
        if "audio" in item:
            out.update(audio_tensor(self.read_audio(item["audio"]), self.body.cfg.audio))
        return out

    def read_audio(self, path: Path) -> tuple[Any, int]:
        """(mono float32 waveform, rate) at the model's rate (soxr, as data_prep resamples)."""
        from pipeline.data.loader import decode_audio

        waveform, rate = decode_audio(path.read_bytes())
        wanted = self.body.cfg.audio.sample_rate
        if rate != wanted:
            import soxr

            from data_prep.audio import RESAMPLE_QUALITY

            waveform, rate = soxr.resample(waveform, rate, wanted, quality=RESAMPLE_QUALITY), wanted
        return waveform, rate

    def blank(self, modality: str) -> dict[str, Any]:
        from pipeline.tasks.downstream_common import blank_audio, blank_image, blank_text

        if modality == "image":
            return {"pixel_values": blank_image(self.image_size)}
        if modality == "text":
            ids, mask = blank_text(self.text_len)
            return {"input_ids": ids, "attention_mask": mask}
        return blank_audio(self.body.cfg.audio)

    def collate(self, prepared: list[dict[str, Any]], mods: tuple[str, ...], batch_size: int,
                prompt: bool = False) -> dict[str, Any]:
        """Stack ``prepared`` padded with blanks to ``batch_size`` rows (pipeline.evaluate's fixed shapes);
        ``prompt``: the rows also hold a VQA generation prompt (the blank text for padding, as VQA pads)."""
        blank = {k: v for m in mods for k, v in self.blank(m).items()}
        if prompt:
            blank.update(prompt_ids=blank["input_ids"], prompt_mask=blank["attention_mask"])
        rows = prepared + [blank] * (batch_size - len(prepared))
        return {key: self.torch.stack([row[key] for row in rows]).to(self.device) for key in blank}

    def inputs(self, batch: dict[str, Any], mods: tuple[str, ...]) -> dict[str, tuple[Any, ...]]:
        return {m: tuple(batch[k] for k in MODALITY_KEYS[m]) for m in mods}

    # modes
    def classifier_heads(self) -> list[str]:
        return [name for name in self.model.classifier_heads() if name in self.label_maps]

    def default_mode(self, gallery: bool) -> str:
        if gallery:
            return "retrieve"
        if VQA_HEAD in self.classifier_heads():
            return "vqa"
        if self.classifier_heads():
            return "classify"
        if LM_HEAD in self.heads and not any(h in self.heads for h in CONTRASTIVE.values()):
            return "caption"
        return "embed"

    def top_labels(self, logits_ba: Any, labels: list[str], k: int, scores: str) -> list[list[dict[str, Any]]]:
        """Each row's top-k labels by logit, with sigmoid (VQA's BCE) or softmax probabilities, best first."""
        probs = logits_ba.sigmoid() if scores == "sigmoid" else logits_ba.softmax(dim=1)
        top = probs.topk(min(k, probs.shape[1]), dim=1)
        return [[{"label": labels[i], "score": round(float(s), 6)} for i, s in zip(idx, val)]
                for idx, val in zip(top.indices.tolist(), top.values.tolist())]

    def head_logits(self, head: str, batch: dict[str, Any], mods: tuple[str, ...]) -> Any:
        """[B, A] fp32 logits of a classifier head on the pooled output of one pass over ``mods``."""
        pooled = self.body.encode(self.inputs(batch, mods)).pooled
        return self.model.heads[head](pooled).float()

    def embed(self, batch: dict[str, Any], modality: str, other: str | None = None) -> Any:
        """[B, P] embeddings of one modality: the contrastive head's L2-normalised projection, as retrieval
        evaluates (``pipeline.tasks.retrieval``), or the raw pooled output [B, D] without such a head.
        ``other``: the modality compared with (picks ITC vs ATC for text)."""
        pooled = self.body.encode(self.inputs(batch, (modality,))).pooled
        head = self.contrastive_head(modality, other)
        if head is None:
            return pooled.float()
        contrastive = self.model.heads[head]
        return contrastive.embed_text(pooled) if modality == "text" else contrastive.embed_image(pooled)

    def contrastive_head(self, modality: str, other: str | None = None) -> str | None:
        media = [m for m in (modality, other) if m and m != "text"]
        wanted = [CONTRASTIVE[media[0]]] if media else [CONTRASTIVE["image"], CONTRASTIVE["audio"]]
        return next((h for h in wanted if self.heads.get(h, {}).get("type") == "itc"), None)

    def generate(self, batch: dict[str, Any], mods: tuple[str, ...], question: bool, options: Any) -> list[str]:
        """Captions (prompt "[CLS]", causal) or, with ``question``, answers after "[CLS] question [SEP]" as a
        bidirectional prompt (``pipeline.tasks.vqa``), decoded without special tokens."""
        from pipeline.model.generation import generate

        torch, tok = self.torch, self.tokenizer
        media = {m: v for m, v in self.inputs(batch, mods).items() if m != "text"}
        b = batch[MODALITY_KEYS[mods[0]][0]].shape[0]
        if question:
            prompt, mask = batch["prompt_ids"], batch["prompt_mask"]
        else:
            prompt = torch.full((b, 1), tok.cls_token_id, dtype=torch.long, device=self.device)
            mask = torch.ones_like(prompt)
        out = generate(self.body, self.model.heads[LM_HEAD], media, prompt, mask, eos_token_id=tok.sep_token_id,
                       pad_token_id=tok.pad_token_id, options=options, prompt_bidirectional=question)
        return [tok.decode(row[:int(n)].tolist(), skip_special_tokens=True).strip()
                for row, n in zip(out.tokens.cpu(), out.lengths.cpu())]


# ------------------------------------------------------------------------------------------------ running
def check_mode(predictor: Predictor, mode: str, items: list[dict[str, Any]], args: argparse.Namespace) -> None:
    """InputError when the model's heads cannot do ``mode`` or an item lacks what it needs."""
    heads, classifiers = predictor.heads, predictor.classifier_heads()
    have = ", ".join(f"{n} ({s.get('type')})" for n, s in heads.items()) or "none"
    if mode == "vqa" and VQA_HEAD not in classifiers:
        raise InputError(f"--mode vqa: the model has no labelled '{VQA_HEAD}' head (heads: {have})")
    if (mode == "caption" or args.generate) and LM_HEAD not in heads:
        raise InputError(f"--mode {mode}{' --generate' if args.generate else ''}: the model has no LM head "
                         f"'{LM_HEAD}' (heads: {have})")
    if mode == "classify":
        head = args.head or next((h for h in classifiers if h != VQA_HEAD), classifiers[0] if classifiers else None)
        if head not in classifiers:
            raise InputError(f"--mode classify: no labelled classifier head {head or ''} (heads: {have})")
        args.head = head
    needs = {"vqa": ("image", "text"), "caption": ()}.get(mode, ())
    for item in items:
        mods = modalities(item)
        missing = [m for m in needs if m not in mods]
        if missing:
            raise InputError(f"{item['where']}: --mode {mode} needs {' and '.join(needs)}, missing {missing}")
        if mode == "caption" and not any(m in mods for m in ("image", "audio")):
            raise InputError(f"{item['where']}: --mode caption needs an image or audio")
        if mode == "retrieve" and len(mods) != 1:
            raise InputError(f"{item['where']}: --mode retrieve takes one of image, text or audio, got {list(mods)}")
        unknown = [m for m in mods if m not in predictor.body.cfg.modalities]
        if unknown:
            raise InputError(f"{item['where']}: the model has no {unknown} (modalities "
                             f"{list(predictor.body.cfg.modalities)})")


def run_batches(predictor: Predictor, items: list[dict[str, Any]], args: argparse.Namespace, mode: str,
                progress: Any = None) -> Iterator[dict[str, Any]]:
    """Results of ``items`` in input order, ``args.batch_size`` consecutive items at a time (grouped by the
    modalities they hold); an item that cannot be decoded yields {"id", "error"}."""
    for start in range(0, len(items), args.batch_size):
        chunk = items[start:start + args.batch_size]
        results: dict[int, dict[str, Any]] = {}
        groups: dict[tuple[str, ...], list[tuple[int, dict[str, Any]]]] = {}
        for index, item in enumerate(chunk):
            try:
                prepared = predictor.prepare(item)
                if mode == "vqa" and args.generate:
                    prepared.update(question_prompt(predictor, item["text"], args))
            except Exception as exc:  # a corrupt image or clip: this item only
                files = ", ".join(str(item[m]) for m in ("image", "audio") if m in item)
                results[index] = {"id": item["id"], "error": f"{item['where']}: {files}: {type(exc).__name__}: "
                                                               f"{str(exc).split(' <_io.BytesIO')[0]}"}
                continue
            groups.setdefault(modalities(item), []).append((index, prepared))
        for mods, members in groups.items():
            outputs = predict_batch(predictor, [p for _, p in members], mods, args, mode)
            for (index, _), out in zip(members, outputs):
                results[index] = {"id": chunk[index]["id"], **out}
        for index in range(len(chunk)):
            yield results[index]
        if progress is not None:
            progress.update(len(chunk))


def question_prompt(predictor: Predictor, question: str, args: argparse.Namespace) -> dict[str, Any]:
    from pipeline.tasks.vqa import answer_lm_text

    lm = answer_lm_text(predictor.tokenizer, question, "", predictor.text_len, answer_tokens(predictor, args))
    return {"prompt_ids": lm["prompt_ids"], "prompt_mask": lm["prompt_mask"]}


def answer_tokens(predictor: Predictor, args: argparse.Namespace) -> int:
    return args.max_new_tokens or 4  # VQAOptions.max_new_tokens's default


def predict_batch(predictor: Predictor, prepared: list[dict[str, Any]], mods: tuple[str, ...],
                  args: argparse.Namespace, mode: str) -> list[dict[str, Any]]:
    torch = predictor.torch
    batch = predictor.collate(prepared, mods, args.batch_size, prompt=mode == "vqa" and args.generate)
    n = len(prepared)
    with torch.no_grad():
        if mode in ("vqa", "classify"):
            head = VQA_HEAD if mode == "vqa" else args.head
            logits = predictor.head_logits(head, batch, mods)[:n]
            tops = predictor.top_labels(logits, predictor.label_maps[head], args.top_k,
                                        "sigmoid" if mode == "vqa" else "softmax")
            key = "answer" if mode == "vqa" else "label"
            out = [{key: top[0]["label"], f"{key}s": [{key: t["label"], "score": t["score"]} for t in top]}
                   for top in tops]
            if mode == "vqa" and args.generate:
                from data_prep.vqa_answers import normalize_answer
                from pipeline.model.generation import DecodeOptions

                options = DecodeOptions(num_beams=args.num_beams, max_new_tokens=answer_tokens(predictor, args))
                for row, text in zip(out, predictor.generate(batch, mods, True, options)):
                    row["generated"] = normalize_answer(text)
            return out
        if mode == "caption":
            from pipeline.model.generation import DecodeOptions

            media = tuple(m for m in mods if m != "text")
            options = DecodeOptions(num_beams=args.num_beams,
                                    max_new_tokens=args.max_new_tokens or predictor.text_len - 1)
            return [{"caption": c} for c in predictor.generate(batch, media, False, options)[:n]]
        return embed_rows(predictor, batch, mods, n, args)  # embed; retrieve embeds its queries so


def embed_rows(predictor: Predictor, batch: dict[str, Any], mods: tuple[str, ...], n: int,
               args: argparse.Namespace) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = [{} for _ in range(n)]
    other = getattr(args, "gallery_modality", None)
    for m in mods:
        emb = predictor.embed(batch, m, other)[:n].cpu()
        for row, vector in zip(rows, emb):
            row[f"{m}_embedding"] = vector
    return rows


def retrieve(predictor: Predictor, queries: list[dict[str, Any]], args: argparse.Namespace,
             progress: Any = None) -> Iterator[dict[str, Any]]:
    """Each query's ``top_k`` gallery items by cosine similarity of their embeddings (``embed``)."""
    gallery = read_gallery(args.gallery)
    kinds = {modalities(item) for item in gallery}
    if len(kinds) != 1 or len(next(iter(kinds))) != 1:
        raise InputError(f"--gallery {args.gallery}: items must all hold one and the same modality, got "
                         f"{sorted(kinds)}")
    gallery_mod = next(iter(kinds))[0]
    query_mods = sorted({modalities(q)[0] for q in queries})
    for mod in query_mods:
        if mod != gallery_mod and predictor.contrastive_head(mod, gallery_mod) is None:
            raise InputError(f"--mode retrieve: {mod} queries against {gallery_mod} gallery items need a contrastive "
                             f"head ({CONTRASTIVE.get(gallery_mod, CONTRASTIVE.get(mod))}); the model has "
                             f"{sorted(predictor.heads)}")
    torch = predictor.torch
    args.gallery_modality = next((m for m in query_mods if m != "text"), query_mods[0])
    ids, vectors = [], []
    for row, item in zip(run_batches(predictor, gallery, args, "embed"), gallery):
        if "error" in row:
            print(f"pipeline.predict: gallery item skipped: {row['error']}", file=sys.stderr)
            continue
        ids.append(item["id"])
        vectors.append(row[f"{gallery_mod}_embedding"])
    if not vectors:
        raise InputError(f"--gallery {args.gallery}: no item could be read")
    gallery_gp = torch.nn.functional.normalize(torch.stack(vectors).float(), dim=-1)
    args.gallery_modality = gallery_mod
    for row in run_batches(predictor, queries, args, "embed", progress):
        if "error" in row:
            yield row
            continue
        query = next(v for k, v in row.items() if k.endswith("_embedding"))
        scores = gallery_gp @ torch.nn.functional.normalize(query.float(), dim=-1)
        top = scores.topk(min(args.top_k, len(ids)))
        yield {"id": row["id"], "matches": [{"id": ids[i], "score": round(float(s), 6)}
                                            for i, s in zip(top.indices.tolist(), top.values.tolist())]}


def jsonable(row: dict[str, Any]) -> dict[str, Any]:
    return {k: [round(float(x), 6) for x in v.tolist()] if hasattr(v, "tolist") else v for k, v in row.items()}


def predict(args: argparse.Namespace) -> tuple[int, int]:
    """Run ``args`` (see ``build_parser``); returns (items written, items that failed)."""
    if args.input:
        items = read_items(Path(args.input))
    else:
        items = [make_item(args.id, args.image, args.text, args.audio, "command line", Path.cwd())]
    folder = Path(args.model)
    if not (folder / "config.json").is_file():
        raise InputError(f"--model {folder}: no config.json (an export folder: python -m pipeline.export)")
    read_preprocessing(folder)  # before the model loads
    if args.gallery and not Path(args.gallery).exists():
        raise InputError(f"--gallery {args.gallery}: no such folder or file")
    if args.no_progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # its "Loading weights" bar
    predictor = Predictor(folder, args.device)
    mode = args.mode or predictor.default_mode(bool(args.gallery))
    check_mode(predictor, mode, items, args)
    from tqdm import tqdm

    out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
    written = failed = 0
    try:
        with tqdm(total=len(items), desc=f"predict {mode}", unit="item", file=sys.stderr,
                  disable=args.no_progress or not args.input) as bar:
            rows = retrieve(predictor, items, args, bar) if mode == "retrieve" else \
                run_batches(predictor, items, args, mode, bar)
            for row in rows:
                out.write(json.dumps(jsonable(row)) + "\n")
                written += 1
                failed += "error" in row
    finally:
        if out is not sys.stdout:
            out.close()
    return written, failed


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)  # --help exits here, before torch is imported
    try:
        written, failed = predict(args)
    except InputError as exc:
        print(f"pipeline.predict: error: {exc}", file=sys.stderr)
        return 2
    if failed:
        print(f"pipeline.predict: {failed} of {written} inputs failed (their lines hold \"error\")", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
