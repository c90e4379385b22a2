"""VQA answer normalisation and soft target scores, as in VQA's ``vqaEval.py``.

One definition for the whole project: ``data_prep vqa`` builds targets and the answer vocabulary with
these, and the official accuracy (``pipeline.metrics.vqa.question_accuracy``) imports them from here.

    >>> normalize_answer("Two dogs.")
    '2 dogs'
    >>> soft_score(2)
    0.6
"""
from __future__ import annotations

import re
from collections import Counter
from typing import Iterable

# The official table, quirks included ("somebody'd" -> "somebodyd").
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've",
    "hasnt": "hasn't", "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've",
    "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've",
    "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've",
    "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock",
    "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've",
    "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've",
    "youll": "you'll", "youre": "you're", "youve": "you've",
}
MANUAL_MAP = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
              "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")
# Kept verbatim from vqaEval.py: "(?!<=\d)" is a look-ahead there (a typo for a look-behind), so a
# period is removed unless a digit follows it.
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
               ",", "?", "!")
SOFT_SCORES = (0.0, 0.3, 0.6, 0.9, 1.0)


def strip_whitespace(text: str) -> str:
    """The official first step: newlines and tabs become spaces, then outer spaces are stripped."""
    return text.replace("\n", " ").replace("\t", " ").strip()


def process_punctuation(text: str) -> str:
    """vqaEval.processPunctuation: drop or space out punctuation, drop periods not before a digit."""
    out = text
    has_digit_comma = COMMA_STRIP.search(text) is not None
    for p in PUNCTUATION:
        if (p + " " in text or " " + p in text) or has_digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    # The official code passes re.UNICODE (32) as `count`: at most 32 periods are removed.
    return PERIOD_STRIP.sub("", out, count=re.UNICODE)


def process_digit_article(text: str) -> str:
    """vqaEval.processDigitArticle: lowercase, number words to digits, drop articles, fix contractions."""
    words = [MANUAL_MAP.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(answer: str) -> str:
    """Full official normalisation of one answer (whitespace, punctuation, digits, articles)."""
    return process_digit_article(process_punctuation(strip_whitespace(answer)))


def soft_score(count: int) -> float:
    """Soft target for an answer given by `count` of the 10 annotators: 0, .3, .6, .9, then 1.0."""
    if count < 0:
        raise ValueError(f"answer count must be >= 0, got {count}")
    return SOFT_SCORES[min(count, len(SOFT_SCORES) - 1)]


def soft_targets(answers: Iterable[str]) -> dict[str, float]:
    """{normalised answer: soft score} for the raw human answers of one question (sorted by answer)."""
    counts = Counter(normalize_answer(a) for a in answers)
    counts.pop("", None)
    return {a: soft_score(c) for a, c in sorted(counts.items())}


def build_vocabulary(counts: Counter, min_count: int) -> tuple[list[str], list[int]]:
    """Answers seen >= min_count times, ordered by count (desc) then alphabetically, with counts."""
    kept = sorted(((a, c) for a, c in counts.items() if c >= min_count and a), key=lambda ac: (-ac[1], ac[0]))
    return [a for a, _ in kept], [c for _, c in kept]
