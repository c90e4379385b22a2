"""Official VQA accuracy: hand-worked cases from vqaEval.py (GT-Vision-Lab/VQA master, a013f00): strip
every answer; normalise answers and prediction only when the stripped answers disagree."""
import pytest

from pipeline.metrics.vqa import (baseline_predictions, question_accuracy, question_type_baseline,
                                  vqa_accuracy)


def answers(matching: str, n_match: int, other: str = "blue") -> list[str]:
    return [matching] * n_match + [other] * (10 - n_match)


@pytest.mark.parametrize("n_match, expected", [
    (0, 0.0),
    # 1 match: leaving it out -> 0 of 9 (0); leaving out any of the 9 others -> 1/3. Mean 9/30.
    (1, 0.3),
    # 2 matches: 2 subsets with 1 match (1/3), 8 subsets with 2 matches (2/3) -> (2/3 + 16/3) / 10.
    (2, 0.6),
    # 3 matches: 3 subsets with 2 (2/3), 7 subsets with 3 (1) -> (2 + 7) / 10.
    (3, 0.9),
    (4, 1.0),
    (10, 1.0),
])
def test_leave_one_out_average(n_match, expected):
    assert question_accuracy("red", answers("red", n_match)) == pytest.approx(expected)


def test_answers_matching_only_after_normalisation():
    # number words -> digits, articles dropped, punctuation removed, lowercase
    gts = ["two", "Two", "2", "two.", "yes", "yes", "yes", "no", "no", "no"]
    assert question_accuracy("2", gts) == pytest.approx(1.0)
    gts = ["a dog", "the dog", "dog", "cat", "cat", "cat", "cat", "cat", "cat", "cat"]
    assert question_accuracy("Dog", gts) == pytest.approx(0.9)
    gts = ["dont know", "don't know", "yes", "yes", "yes", "yes", "yes", "yes", "yes", "yes"]
    assert question_accuracy("don't know", gts) == pytest.approx(0.6)


def test_all_identical_answers_are_not_normalised():
    gts = ["Two"] * 10
    assert question_accuracy("Two", gts) == 1.0
    assert question_accuracy("two", gts) == 0.0  # no lowercasing
    assert question_accuracy("2", gts) == 0.0  # no number-word mapping
    # the prediction still gets newline/tab replacement and stripping
    assert question_accuracy(" Two\n", gts) == 1.0


def test_prediction_is_normalised_when_answers_differ():
    gts = ["2"] * 9 + ["3"]
    assert question_accuracy("Two.", gts) == pytest.approx(1.0)


@pytest.mark.parametrize("prediction, gts, expected", [
    ("two", ["2"] * 10, 0.0),                   # identical answers: nothing is normalised
    ("Yes", ["yes"] * 10, 0.0),
    ("yes", ["yes"] * 10, 1.0),
    ("2", ["two"] * 3 + ["3"] * 7, 0.9),        # answers differ: "two" -> "2" matches 3 answers
    ("dog", ["the dog"] * 4 + ["cat"] * 6, 1.0),  # articles dropped from the answers too
    ("Yes", ["yes"] * 9 + ["yes\n"], 0.0),      # answers are stripped BEFORE the agreement test
    ("yes", [" yes"] * 10, 1.0),
])
def test_official_master_cases(prediction, gts, expected):
    assert question_accuracy(prediction, gts) == pytest.approx(expected)


def test_overall_and_per_answer_type():
    preds = ["yes", "2", "red"]
    gts = [["yes"] * 10, answers("2", 2, "3"), answers("blue", 10)]
    types = ["yes/no", "number", "other"]
    res = vqa_accuracy(preds, gts, types)
    assert res["acc"] == pytest.approx((1.0 + 0.6 + 0.0) / 3)
    assert res["acc/yes/no"] == 1.0
    assert res["acc/number"] == pytest.approx(0.6)
    assert res["acc/other"] == 0.0
    assert res["num_scored"] == 3


def test_questions_without_answers_are_not_scored():
    res = vqa_accuracy(["yes", "no"], [["yes"] * 10, []], ["yes/no", "yes/no"])
    assert res["acc"] == 1.0 and res["num_scored"] == 1


def test_question_type_baseline_uses_most_frequent_answer_per_type():
    train = [("is there", ["yes"] * 10), ("is there", ["no"] * 6 + ["yes"] * 4),
             ("is there", ["yes"] * 7 + ["no"] * 3), ("is there", ["yes"] * 10),
             # "two" and "2" are one answer after normalisation
             ("how many", ["two"] * 6 + ["3"] * 4), ("how many", ["2"] * 10), ("what color", ["red"] * 10)]
    table, fallback = question_type_baseline(train)
    assert table == {"is there": "yes", "how many": "2", "what color": "red"}
    assert fallback == "yes"
    assert baseline_predictions(["how many", "unseen type"], table, fallback) == ["2", "yes"]


def test_empty_answer_type_gets_no_per_type_key():
    res = vqa_accuracy(["yes", "no"], [["yes"] * 10, ["yes"] * 10], ["", "yes/no"])
    assert res == {"acc": 0.5, "num_scored": 2.0, "acc/yes/no": 0.0}


def test_no_scored_question_reports_no_accuracy():
    assert vqa_accuracy(["yes", "no"], [[], []], ["yes/no", "other"]) == {"num_scored": 0.0}
