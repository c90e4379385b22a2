"""COCO caption evaluation metrics (BLEU-1..4, METEOR where possible, ROUGE-L, CIDEr-D), as pycocoevalcap.

The reference is salaniz/pycocoevalcap 1.2 (the pip package of tylin/coco-caption's Python 3 port):
``eval.py`` tokenises references and candidates with ``tokenizer/ptbtokenizer.py`` (here the pure-Python
``ptb_tokenize``, no Java) and then scores, per image, one candidate against its references:

- BLEU-n (``bleu/bleu_scorer.py``, ``compute_score(option='closest')``): corpus-level. Clipped n-gram
  matches and candidate n-grams are summed over all images; the brevity penalty compares the summed
  candidate length with the summed reference lengths, each image's reference length being the one closest
  to its candidate's (ties: the shorter). ``tiny`` 1e-15 and ``small`` 1e-9 guard the ratios as there.
- ROUGE-L (``rouge/rouge.py``): per image, the LCS F-measure with beta 1.2 from the best precision and the
  best recall over the references (tokens split on single spaces); the mean over images.
- CIDEr-D (``cider/cider_scorer.py``, class ``Cider``, which is coco-caption's CIDEr-D: clipped tf-idf
  n-gram vectors, Gaussian length penalty sigma 6, x10, no stemming): n = 1..4; document frequencies
  from the references of the evaluated images only and log(number of images) as the reference "length"
  of the idf; the candidate/reference length in the penalty is the number of bigrams, as that code
  counts it. Per image the mean over n of the mean over references; the mean over images.
- METEOR (``meteor/meteor.py``, Meteor 1.5 ``-l en -norm``) needs Java and the jar shipped in
  pycocoevalcap: it is computed only when ``java`` is on PATH and ``pycocoevalcap`` is importable
  (``pip install pycocoevalcap``, not in requirements.txt: its wheel is large); otherwise the key is absent.

Every score is a fraction as pycocoevalcap returns it (CIDEr-D is on its 0-10 scale, x10 included).
"""
from __future__ import annotations

import logging
import math
import shutil
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence

import numpy as np

from pipeline.metrics.ptb_tokenizer import ptb_tokenize_lines

logger = logging.getLogger(__name__)

BLEU_N = 4
CIDER_N = 4
CIDER_SIGMA = 6.0
ROUGE_BETA = 1.2
_BLEU_TINY = 1e-15  # bleu_scorer.py: "so that if guess is 0 still return 0"
_BLEU_SMALL = 1e-9


def ngram_counts(words: Sequence[str], n: int) -> Counter:
    """Counts of every 1..n-gram (tuples) of a token list (``precook`` in bleu_scorer/cider_scorer)."""
    counts: Counter = Counter()
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            counts[tuple(words[i:i + k])] += 1
    return counts


def bleu(candidates: Sequence[str], references: Sequence[Sequence[str]], n: int = BLEU_N) -> list[float]:
    """Corpus BLEU-1..n of tokenised candidates (one per image) against their tokenised references."""
    correct, guess = [0] * n, [0] * n
    test_len, ref_len = 0, 0
    for cand, refs in zip(candidates, references):
        words = cand.split()
        counts = ngram_counts(words, n)
        max_ref: dict[tuple, int] = {}
        ref_lens = []
        for ref in refs:
            ref_words = ref.split()
            ref_lens.append(len(ref_words))
            for gram, count in ngram_counts(ref_words, n).items():
                max_ref[gram] = max(max_ref.get(gram, 0), count)
        test_len += len(words)
        ref_len += min((abs(length - len(words)), length) for length in ref_lens)[1]
        for k in range(n):
            guess[k] += max(0, len(words) - k)
        for gram, count in counts.items():
            correct[len(gram) - 1] += min(max_ref.get(gram, 0), count)
    scores, product = [], 1.0
    for k in range(n):
        product *= float(correct[k] + _BLEU_TINY) / (guess[k] + _BLEU_SMALL)
        scores.append(product ** (1.0 / (k + 1)))
    ratio = (test_len + _BLEU_TINY) / (ref_len + _BLEU_SMALL)
    if ratio < 1:
        scores = [s * math.exp(1 - 1 / ratio) for s in scores]
    return scores


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token lists."""
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l_image(candidate: str, references: Sequence[str], beta: float = ROUGE_BETA) -> float:
    """ROUGE-L of one tokenised candidate against its references (``Rouge.calc_score``)."""
    cand = candidate.split(" ")
    precisions, recalls = [], []
    for ref in references:
        ref_tokens = ref.split(" ")
        lcs = _lcs_length(ref_tokens, cand)
        precisions.append(lcs / float(len(cand)))
        recalls.append(lcs / float(len(ref_tokens)))
    p, r = max(precisions), max(recalls)
    if p == 0 or r == 0:
        return 0.0
    return ((1 + beta ** 2) * p * r) / float(r + beta ** 2 * p)


def rouge_l(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Mean ROUGE-L over images."""
    return float(np.mean(np.array([rouge_l_image(c, refs) for c, refs in zip(candidates, references)])))


def cider_d_per_image(candidates: Sequence[str], references: Sequence[Sequence[str]], n: int = CIDER_N,
                      sigma: float = CIDER_SIGMA) -> list[float]:
    """CIDEr-D of each image (``CiderScorer.compute_cider``), idf from these images' references."""
    cand_counts = [ngram_counts(c.split(), n) for c in candidates]
    ref_counts = [[ngram_counts(r.split(), n) for r in refs] for refs in references]
    doc_freq: Counter = Counter()
    for refs in ref_counts:
        for gram in {g for counts in refs for g in counts}:
            doc_freq[gram] += 1
    log_num_images = np.log(float(len(ref_counts)))

    def vector(counts: Counter) -> tuple[list[dict], list[float], int]:
        vec: list[dict] = [{} for _ in range(n)]
        norm = [0.0] * n
        length = 0
        for gram, tf in counts.items():
            k = len(gram) - 1
            vec[k][gram] = float(tf) * (log_num_images - np.log(max(1.0, doc_freq.get(gram, 0.0))))
            norm[k] += pow(vec[k][gram], 2)
            if k == 1:  # cider_scorer.py counts the bigrams as "length"
                length += tf
        return vec, [np.sqrt(x) for x in norm], length

    scores = []
    for cand, refs in zip(cand_counts, ref_counts):
        vec, norm, length = vector(cand)
        total = np.zeros(n)
        for ref in refs:
            vec_ref, norm_ref, length_ref = vector(ref)
            delta = float(length - length_ref)
            val = np.zeros(n)
            for k in range(n):
                for gram in vec[k]:
                    ref_weight = vec_ref[k].get(gram, 0.0)
                    val[k] += min(vec[k][gram], ref_weight) * ref_weight
                if norm[k] != 0 and norm_ref[k] != 0:
                    val[k] /= norm[k] * norm_ref[k]
                val[k] *= np.e ** (-(delta ** 2) / (2 * sigma ** 2))
            total += val
        scores.append(float(np.mean(total) / len(refs) * 10.0))
    return scores


def cider_d(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Mean CIDEr-D over images (``Cider().compute_score``)."""
    return float(np.mean(np.array(cider_d_per_image(candidates, references))))


def meteor_available() -> bool:
    """True when pycocoevalcap's METEOR can run here: ``java`` on PATH and ``pycocoevalcap`` importable."""
    if shutil.which("java") is None:
        return False
    try:
        import pycocoevalcap.meteor.meteor  # noqa: F401
    except ImportError:
        return False
    return True


def meteor(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Official METEOR 1.5 through pycocoevalcap (needs ``meteor_available()``)."""
    from pycocoevalcap.meteor.meteor import Meteor

    ids = list(range(len(candidates)))
    score, _ = Meteor().compute_score({i: list(references[i]) for i in ids}, {i: [candidates[i]] for i in ids})
    return float(score)


def check_ids(predictions: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]]) -> list:
    """The ids to score (prediction order); ValueError naming ids that lack a prediction, references, or
    have an empty reference list."""
    no_refs = [i for i in predictions if i not in references]
    no_pred = [i for i in references if i not in predictions]
    empty = [i for i in predictions if i in references and not references[i]]
    problems = []
    for ids, what in ((no_refs, "have a prediction but no references"),
                      (no_pred, "have references but no prediction"), (empty, "have an empty reference list")):
        if ids:
            problems.append(f"{len(ids)} ids {what} (first: {', '.join(repr(i) for i in ids[:5])})")
    if problems:
        raise ValueError("caption_metrics: " + "; ".join(problems))
    if not predictions:
        raise ValueError("caption_metrics: no prediction to score")
    return list(predictions)


def caption_metrics(predictions: Mapping[Hashable, str],
                    references: Mapping[Hashable, Sequence[str]]) -> dict[str, float]:
    """COCO caption metrics of raw predicted captions (one per id) against raw reference captions:
    ``{bleu1..bleu4, rouge_l, cider_d}`` plus ``meteor`` when ``meteor_available()``. Tokenises itself as
    ``COCOEvalCap.evaluate`` does: all references in one tokenizer pass, all predictions in another, in
    the order of ``predictions`` (the official tool uses the ground truth's image order)."""
    ids = check_ids(predictions, references)
    cands = ptb_tokenize_lines([predictions[i] for i in ids])
    flat_refs = iter(ptb_tokenize_lines([r for i in ids for r in references[i]]))
    refs = [[next(flat_refs) for _ in references[i]] for i in ids]
    result = {f"bleu{k + 1}": float(s) for k, s in enumerate(bleu(cands, refs))}
    result["rouge_l"] = rouge_l(cands, refs)
    result["cider_d"] = cider_d(cands, refs)
    if meteor_available():
        result["meteor"] = meteor(cands, refs)
    else:
        logger.info("METEOR left out: it needs java on PATH and `pip install pycocoevalcap`")
    return result
