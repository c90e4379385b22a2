"""Official VQA accuracy (``vqaEval.py``) and the question-only baseline.

The reference is ``PythonEvaluationTools/vqaEvaluation/vqaEval.py`` of GT-Vision-Lab/VQA at master
(commit a013f00, "Fixed processing answers bug", 2021): newlines/tabs become spaces and outer spaces are
stripped in the prediction and the human answers; then, **only when the stripped human answers are not
all identical**, both the answers and the prediction get the full normalisation (``processPunctuation``
then ``processDigitArticle`` = ``normalize_answer``, the one definition in ``data_prep.vqa_answers``).
Per question, for each of the (usually 10) human answers g_i: ``min(1, #(other answers == prediction) /
3)``, averaged over the leave-one-out subsets. Earlier versions of the script (2015-2021) always
normalised the prediction and only punctuation-processed the answers; scores differ on few questions.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence

from data_prep.vqa_answers import normalize_answer, strip_whitespace


def question_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Official accuracy of one predicted answer against the human answers (usually 10)."""
    if not answers:
        raise ValueError("question_accuracy needs at least one ground-truth answer")
    prediction = strip_whitespace(prediction)
    answers = [strip_whitespace(a) for a in answers]
    if len(set(answers)) > 1:
        answers = [normalize_answer(a) for a in answers]
        prediction = normalize_answer(prediction)
    scores = []
    for i in range(len(answers)):
        others = answers[:i] + answers[i + 1:]
        scores.append(min(1.0, sum(a == prediction for a in others) / 3.0))
    return sum(scores) / len(scores)


def mean_by_type(scores: Sequence[float], types: Sequence[str] | None, key: str = "acc") -> dict[str, float]:
    """``{key: mean, key/<type>: mean per type, num_scored}``; empty types get no per-type key. With no
    score at all ``key`` is left out (an accuracy of nothing is not 0): ``{"num_scored": 0.0}``."""
    if not scores:
        return {"num_scored": 0.0}
    per_type: dict[str, list[float]] = defaultdict(list)
    for score, kind in zip(scores, types or [""] * len(scores)):
        if kind:
            per_type[kind].append(score)
    result = {key: sum(scores) / len(scores), "num_scored": float(len(scores))}
    for kind in sorted(per_type):
        result[f"{key}/{kind}"] = sum(per_type[kind]) / len(per_type[kind])
    return result


def vqa_accuracy(predictions: Sequence[str], answers: Sequence[Sequence[str]],
                 answer_types: Sequence[str] | None = None) -> dict[str, float]:
    """Mean official accuracy overall (``acc``) and per non-empty answer type (``acc/<type>``), as
    fractions. Questions without ground-truth answers (test splits) are left out; ``num_scored`` says
    how many were scored, and ``acc`` is absent when none was."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} questions")
    types = list(answer_types) if answer_types is not None else [""] * len(predictions)
    scored = [(question_accuracy(p, gts), t) for p, gts, t in zip(predictions, answers, types) if gts]
    return mean_by_type([s for s, _ in scored], [t for _, t in scored])


def consensus_answer(answers: Sequence[str]) -> str:
    """Most frequent normalised human answer of one question (ties: alphabetical first)."""
    counts = Counter(normalize_answer(a) for a in answers)
    return min(counts, key=lambda a: (-counts[a], a))


def most_frequent_by_type(pairs: Iterable[tuple[str, str]]) -> tuple[dict[str, str], str]:
    """``(type, answer)`` pairs -> ``(most frequent answer per type, most frequent answer overall)``;
    ties go to the alphabetically first answer."""
    by_type: dict[str, Counter] = defaultdict(Counter)
    overall: Counter = Counter()
    for kind, answer in pairs:
        by_type[kind][answer] += 1
        overall[answer] += 1
    if not overall:
        raise ValueError("most_frequent_by_type: no training answer")

    def top(counter: Counter) -> str:
        return min(counter, key=lambda a: (-counter[a], a))

    return {kind: top(c) for kind, c in by_type.items()}, top(overall)


def question_type_baseline(train: Iterable[tuple[str, Sequence[str]]]) -> tuple[dict[str, str], str]:
    """The question-only baseline: for each question type, the most frequent train answer (each train
    question contributes its consensus answer). Returns ``(answer per type, global fallback answer)``."""
    return most_frequent_by_type((qtype, consensus_answer(answers)) for qtype, answers in train if answers)


def baseline_predictions(question_types: Sequence[str], table: dict[str, str], fallback: str) -> list[str]:
    return [table.get(qtype, fallback) for qtype in question_types]
