"""Dev-only check: our caption metrics (``pipeline.metrics.captioning``) against the official pycocoevalcap.

Needs Java and pycocoevalcap, which the project does not install; run it with a Python that has both::

    python3 -m venv /tmp/coco && /tmp/coco/bin/pip install pycocoevalcap
    /tmp/coco/bin/python bench/caption_metrics_vs_official.py --images 1000

It builds a deterministic caption set (shapes-world captions in COCO style plus sentences stressing the
tokenizer: clitics, abbreviations, numbers, quotes, brackets, dashes, symbols, URLs, non-ASCII), runs the
official ``PTBTokenizer`` (CoreNLP 3.4.1, Java) and ``Bleu(4)``, ``Rouge``, ``Cider`` on it and our
``ptb_tokenize`` and scorers on the same raw captions, and prints: tokenisations identical k/n (with the
first differences) and the largest |ours - official| per metric, on the official tokens and end to end.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.metrics import captioning  # noqa: E402
from pipeline.metrics.ptb_tokenizer import ptb_tokenize_lines  # noqa: E402

COLORS = ["red", "green", "blue", "yellow", "purple", "orange", "grey", "gray", "black-and-white", "dark-blue"]
SHAPES = ["circle", "square", "triangle", "star", "cat", "dog", "teddy bear", "man", "woman", "bus", "pizza"]
PLACES = ["park", "kitchen", "street", "beach", "U.S. city", "St. Louis station", "living room", "field"]
VERBS = ["sitting", "standing", "running", "lying", "parked", "flying", "eating", "looking"]
PREPS = ["on", "in", "next to", "near", "under", "in front of", "at the top-left of", "beside"]
EXTRAS = [
    "It's a man's dog.", "Two dogs aren't playing; they're sleeping.", "Kids can't (won't) eat.",
    "She cannot wait, gonna go!", "A \"big\" cat", "The 'little' bus", "\u201cquoted\u201d and \u2018single\u2019",
    "isn\u2019t it", "1,000 people", "3.5 kg at 10:30 a.m.", "on 12/25/2014", "costs $3.50 (50%)",
    "1/2 of a pizza", "\u00bd pizza", "e.g. a dog", "i.e. nothing", "Mr. Smith vs. Dr. Jones", "Inc. and Co.",
    "No. 5 bus", "etc.", "etc. The end", "a.k.a. Bob", "rock'n'roll", "o'clock", "y'all", "the '90s",
    "well-known 3-year-old x-ray", "mother-in-law's", "AT&T and at&t", "US$ 5", "C++ code", "R&B music",
    "a/b test", "and/or", "--- dash -- dash - dash", "wait...", "wait . . . what", "really?!", "no!!",
    "{braces} [brackets] <tag> < 3", "@user #tag", "mail a.b@c.com", "see www.example.com/page",
    "http://x.org/a?b=c", "caf\u00e9 na\u00efve", "\u00e9l\u00e8ve", "\u2014 em dash \u2013 en dash",
    "the U.S. The end", "I. The", "colour, harbour", "teddy bear.A cat", "Mass. and mass.", "Calif. coast",
    "tab\there", "  leading and trailing  ", "UPPER CASE CAPTION", "MiXeD CaSe", "a+b=c", "50 % off", "#1 fan",
    "d'Artagnan", "l'amour", "O'Neil and o'neil", "'tis 'twas", "can't won't shan't", "I'm we've you'll he'd",
    "10-20 people", "-5 degrees", "+3", "1.5.2", "3:45", "555-123-4567", "(555) 123-4567", ":) smile",
    "emoji \U0001f600",
    "fig. 3", "ca. 1900", "pp. 4", "Feb. 3", "Jan. The", "Ph.D. student", "Jr. and Sr.", "Wash. state",
    "p.m. tonight", "A.", "U.K.", "N.Y.C.", "Sept. 11", "Pty. Ltd.", "file.txt", "image.jpg.", "x.py, y.c",
    "half-\u00admoon", "soft\u00adhyphen", "ice-cream's", "dogs'", "James' cat", "it's.", "dog.,", "cats.;",
    "3-year-old.,", "\u2026", "\u00a3 5 and \u20ac 5 and \u00a2", "&amp; &lt; &gt; &quot;", "< b >", "x<y",
    "", "   ", ".", "!!!", "a", "A man.", "A MAN.", "a man", "a, man", "a man!", "a man?",
]


def shapes_caption(rng: random.Random) -> str:
    """A COCO-style caption about the shapes world, with random case and punctuation."""
    text = (f"{rng.choice(['A', 'a', 'The', 'An image of a', 'There is a', 'Two'])} {rng.choice(COLORS)} "
            f"{rng.choice(SHAPES)} {rng.choice(VERBS)} {rng.choice(PREPS)} the {rng.choice(PLACES)}")
    if rng.random() < 0.3:
        text += " " + rng.choice(EXTRAS)
    text += rng.choice(["", ".", " .", "!", "?", "...", ",", ";"])
    if rng.random() < 0.1:
        text = text.upper()
    return text


def stress_caption(rng: random.Random) -> str:
    """A sentence built from tokenizer stress phrases."""
    return " ".join(rng.choice(EXTRAS) for _ in range(rng.randint(1, 4)))


def build_set(images: int, refs_per_image: int, seed: int) -> tuple[dict, dict]:
    """(predictions {id: caption}, references {id: [captions]}), half shapes-world, half stress text."""
    rng = random.Random(seed)
    preds, refs = {}, {}
    for i in range(images):
        make = shapes_caption if i % 2 == 0 else stress_caption
        refs[i] = [make(rng) for _ in range(refs_per_image)]
        preds[i] = rng.choice([refs[i][0], make(rng), shapes_caption(rng), stress_caption(rng)])
    for i, extra in enumerate(EXTRAS):  # every stress phrase alone at least once
        refs[images + i] = [extra, shapes_caption(rng)]
        preds[images + i] = extra
    return preds, refs


def official(preds: dict, refs: dict) -> tuple[dict, dict, dict]:
    """Official tokens (gts, res) and scores {bleu1..4, rouge_l, cider_d} from pycocoevalcap."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": c} for c in caps] for i, caps in refs.items()})
    res = tokenizer.tokenize({i: [{"caption": preds[i]}] for i in refs})
    scores = dict(zip(["bleu1", "bleu2", "bleu3", "bleu4"], Bleu(4).compute_score(gts, res, verbose=0)[0]))
    scores["rouge_l"] = Rouge().compute_score(gts, res)[0]
    scores["cider_d"] = Cider().compute_score(gts, res)[0]
    return gts, res, {k: float(v) for k, v in scores.items()}


def ours_on_tokens(gts: dict, res: dict) -> dict:
    """Our scorers on already tokenised captions (isolates the scorers from the tokenizer)."""
    ids = list(gts)
    cands, refs = [res[i][0] for i in ids], [gts[i] for i in ids]
    scores = dict(zip(["bleu1", "bleu2", "bleu3", "bleu4"], captioning.bleu(cands, refs)))
    scores["rouge_l"] = captioning.rouge_l(cands, refs)
    scores["cider_d"] = captioning.cider_d(cands, refs)
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1000, help="generated images (5 references each)")
    parser.add_argument("--refs", type=int, default=5, help="references per generated image")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    preds, refs = build_set(args.images, args.refs, args.seed)
    gts, res, official_scores = official(preds, refs)
    raw_refs = [c for caps in refs.values() for c in caps]
    raw_preds = [preds[i] for i in refs]
    pairs = list(zip(raw_refs + raw_preds, ptb_tokenize_lines(raw_refs) + ptb_tokenize_lines(raw_preds),
                     [t for i in refs for t in gts[i]] + [res[i][0] for i in refs]))
    differ = [(raw, want, got) for raw, got, want in pairs if got != want]
    on_tokens = ours_on_tokens(gts, res)
    end_to_end = {k: v for k, v in captioning.caption_metrics(preds, refs).items() if k in official_scores}
    report = {
        "captions": len(pairs), "tokenisations_identical": len(pairs) - len(differ),
        "official": official_scores,
        "max_abs_diff_on_official_tokens": max(abs(on_tokens[k] - official_scores[k]) for k in official_scores),
        "abs_diff_on_official_tokens": {k: abs(on_tokens[k] - official_scores[k]) for k in official_scores},
        "abs_diff_end_to_end": {k: abs(end_to_end[k] - official_scores[k]) for k in official_scores},
    }
    print(f"tokenisations identical: {report['tokenisations_identical']}/{report['captions']}")
    for raw, want, got in differ[:20]:
        print(f"  differ: {raw!r}\n    official {want!r}\n    ours     {got!r}")
    print(f"{'metric':8s} {'official':>10s} {'|diff| on official tokens':>26s} {'|diff| end to end':>18s}")
    for k, v in official_scores.items():
        print(f"{k:8s} {v:10.6f} {report['abs_diff_on_official_tokens'][k]:26.3g} "
              f"{report['abs_diff_end_to_end'][k]:18.3g}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
