"""VQA answer normalisation (official vqaEval.py rules and tables, hand-worked), soft scores, vocabulary.
The accuracy itself is tested in test_metrics_vqa.py."""
from __future__ import annotations

from collections import Counter

import pytest

from data_prep.vqa_answers import (build_vocabulary, normalize_answer, process_digit_article, process_punctuation,
                                   soft_score, soft_targets)


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


@pytest.mark.parametrize("raw, expected", [
    ("1,000 black/white", "1000 blackwhite"),  # a digit,digit anywhere: every mark is removed, not spaced
    ("x-ray - yes", "xray  yes"),           # ' - ' anywhere: every '-' is removed, not spaced
    ("x-ray", "x ray"),                     # otherwise each mark becomes a space
    ("(yes)", " yes "),
    ("3.5.", "3.5"),                        # a period before a digit stays, the last one goes
    ("a.m.", "am"),
    ("don't", "don't"),                     # ' and : are not in the table
    ("12:30", "12:30"),
    ("." * 40, "." * 8),                    # the official code passes re.UNICODE (32) as the count
])
def test_process_punctuation_quirks(raw, expected):
    assert process_punctuation(raw) == expected


@pytest.mark.parametrize("raw, expected", [
    ("Zero none ONE two three four five six seven eight nine ten eleven",
     "0 0 1 2 3 4 5 6 7 8 9 10 eleven"),   # number words up to ten only, after lowercasing
    ("A cat and AN owl under THE tree", "cat and owl under tree"),  # articles dropped as whole words
    ("theater another", "theater another"),
    ("youre wont shouldnt've", "you're won't shouldn't've"),  # contraction table, per word
    ("somebody'd", "somebodyd"),          # the table's own quirk
    ("Im", "im"),                          # key 'Im' never matches: the text is lowercased first
])
def test_process_digit_article_tables(raw, expected):
    assert process_digit_article(raw) == expected


def test_build_vocabulary_order_and_threshold():
    counts = Counter({"yes": 5, "no": 5, "2": 3, "red": 1, "": 9})
    assert build_vocabulary(counts, 2) == (["no", "yes", "2"], [5, 5, 3])
    assert build_vocabulary(counts, 1)[0] == ["no", "yes", "2", "red"]
