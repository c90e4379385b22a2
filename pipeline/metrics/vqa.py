"""Official VQA accuracy (``vqaEval.py``) and the question-only baseline.

Per question, for each of the 10 human answers g_i: ``min(1, #(other 9 answers == prediction) / 3)``,
averaged over the 10 leave-one-out subsets. Before comparing, newlines/tabs become spaces and the
prediction is stripped; the punctuation / digit / article normalisation (``normalize_answer``, the one
definition in ``data_prep.vqa_answers``) is applied to the prediction and the answers **only when the 10
answers are not all identical** (as the official script does).
"""
from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence

from data_prep.vqa_answers import normalize_answer


def _clean(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def question_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Official accuracy of one predicted answer against the human answers (usually 10)."""
    if not answers:
        raise ValueError("question_accuracy needs at least one ground-truth answer")
    prediction = _clean(prediction)
    answers = list(answers)
    if len(set(answers)) > 1:
        answers = [normalize_answer(a) for a in answers]
        prediction = normalize_answer(prediction)
    scores = []
    for i in range(len(answers)):
        others = answers[:i] + answers[i + 1:]
        scores.append(min(1.0, sum(a == prediction for a in others) / 3.0))
    return sum(scores) / len(scores)


def vqa_accuracy(predictions: Sequence[str], answers: Sequence[Sequence[str]],
                 answer_types: Sequence[str] | None = None) -> dict[str, float]:
    """Mean official accuracy overall (``acc``) and per answer type (``acc/<type>``), as fractions.

    Questions without ground-truth answers (test splits) are left out; ``num_scored`` says how many
    questions were scored.
    """
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} questions")
    answer_types = answer_types if answer_types is not None else ["all"] * len(predictions)
    per_type: dict[str, list[float]] = defaultdict(list)
    scores = []
    for pred, gts, atype in zip(predictions, answers, answer_types):
        if not gts:
            continue
        score = question_accuracy(pred, gts)
        scores.append(score)
        per_type[atype].append(score)
    result = {"acc": sum(scores) / len(scores) if scores else 0.0, "num_scored": float(len(scores))}
    for atype in sorted(per_type):
        result[f"acc/{atype}"] = sum(per_type[atype]) / len(per_type[atype])
    return result


def consensus_answer(answers: Sequence[str]) -> str:
    """Most frequent normalised human answer of one question (ties: alphabetical first)."""
    counts = Counter(normalize_answer(_clean(a)) for a in answers)
    return min(counts, key=lambda a: (-counts[a], a))


def question_type_baseline(train: Iterable[tuple[str, Sequence[str]]]) -> tuple[dict[str, str], str]:
    """The question-only baseline: for each question type, the most frequent train answer (each train
    question contributes its consensus answer). Returns ``(answer per type, global fallback answer)``."""
    by_type: dict[str, Counter] = defaultdict(Counter)
    overall: Counter = Counter()
    for question_type, answers in train:
        if not answers:
            continue
        answer = consensus_answer(answers)
        by_type[question_type][answer] += 1
        overall[answer] += 1
    if not overall:
        raise ValueError("question_type_baseline: no train question has answers")

    def top(counter: Counter) -> str:
        return min(counter, key=lambda a: (-counter[a], a))

    return {qtype: top(c) for qtype, c in by_type.items()}, top(overall)


def baseline_predictions(question_types: Sequence[str], table: dict[str, str], fallback: str) -> list[str]:
    return [table.get(qtype, fallback) for qtype in question_types]
