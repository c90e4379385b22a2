"""GQA accuracy as GQA's eval.py computes it: exact string match, overall and per question type."""
import pytest

from pipeline.metrics.gqa import gqa_accuracy


def test_exact_match_overall_and_per_question_type():
    res = gqa_accuracy(["yes", "Yes", "red", "left"], ["yes", "yes", "red", "right"],
                       ["verify", "verify", "query", "choose"])
    assert res["acc"] == pytest.approx(0.5)  # "Yes" != "yes": no normalisation
    assert res["acc/verify"] == 0.5 and res["acc/query"] == 1.0 and res["acc/choose"] == 0.0
    assert res["num_scored"] == 4


def test_questions_without_gold_answer_are_not_scored():
    assert gqa_accuracy(["yes", "no"], ["yes", ""], ["verify", "verify"])["num_scored"] == 1
    assert gqa_accuracy(["yes"], [None], ["verify"]) == {"num_scored": 0.0}
