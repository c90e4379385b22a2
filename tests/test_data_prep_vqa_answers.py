"""VQA answer normalisation (official vqaEval.py rules, hand-worked), soft scores, accuracy, vocabulary."""
from __future__ import annotations

from collections import Counter

import pytest

from data_prep.vqa_answers import build_vocabulary, normalize_answer, soft_score, soft_targets, vqa_accuracy


@pytest.mark.parametrize("raw, expected", [
    ("Two", "2"),                          # number word -> digit, lowercase
    ("  None\n", "0"),                     # whitespace stripped, 'none' -> '0'
    ("the dog.", "dog"),                   # period not before a digit removed, article dropped
    ("an apple", "apple"),
    ("3.5", "3.5"),                        # period before a digit kept
    ("1,000", "1000"),                     # digit,digit: every punctuation mark is removed, not spaced
    ("red, white and blue", "red white and blue"),  # ', ' -> comma removed
    ("black/white", "black white"),        # punctuation with no space around -> space
    ("t-shirt", "t shirt"),
    ("yes!", "yes"),
    ("e.g.", "eg"),
    ("dont", "don't"),                     # contraction table
    ("Isnt", "isn't"),
    ("Ive", "ive"),                        # official quirk: table key is 'Ive', text is lowercased first
    ("it's", "it's"),                      # apostrophes are not punctuation here
    ("A Red Car", "red car"),
])
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_soft_scores():
    assert [soft_score(c) for c in range(7)] == [0.0, 0.3, 0.6, 0.9, 1.0, 1.0, 1.0]
    with pytest.raises(ValueError):
        soft_score(-1)
    targets = soft_targets(["yes"] * 7 + ["No"] * 2 + ["maybe."])
    assert targets == {"maybe": 0.3, "no": 0.6, "yes": 1.0}
    assert soft_targets(["two", "2", "2 ", "3"]) == {"2": 0.9, "3": 0.3}


def test_vqa_accuracy_official_leave_one_out():
    gts = ["two", "2", "2", "3", "3", "3", "3", "3", "3", "3"]
    # normalised: 2,2,2,3x7. Leaving out a '2' leaves 2 matches (2/3), leaving out a '3' leaves 3 (1).
    assert vqa_accuracy("2", gts) == pytest.approx((3 * 2 / 3 + 7 * 1.0) / 10)
    assert vqa_accuracy("Three", gts) == 1.0  # six or seven '3' remain whichever is left out
    assert vqa_accuracy("4", gts) == 0.0
    assert vqa_accuracy("3", ["3"] * 10) == 1.0
    assert vqa_accuracy("three", ["3"] * 10) == 0.0  # identical answers: no normalisation (official)
    assert vqa_accuracy("3\n", ["3"] * 10) == 1.0


def test_build_vocabulary_order_and_threshold():
    counts = Counter({"yes": 5, "no": 5, "2": 3, "red": 1, "": 9})
    assert build_vocabulary(counts, 2) == (["no", "yes", "2"], [5, 5, 3])
    assert build_vocabulary(counts, 1)[0] == ["no", "yes", "2", "red"]
