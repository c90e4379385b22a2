"""GQA accuracy as GQA's official ``eval.py`` computes it: exact string match of the predicted answer
with the gold answer (no normalisation), overall and per ``question_type``."""
from __future__ import annotations

from collections.abc import Sequence

from pipeline.metrics.vqa import mean_by_type


def gqa_accuracy(predictions: Sequence[str], answers: Sequence[str | None],
                 question_types: Sequence[str]) -> dict[str, float]:
    """``{"acc", "acc/<question_type>", "num_scored"}``; questions without a gold answer (test) are not
    scored, and ``acc`` is absent when none was."""
    if not (len(predictions) == len(answers) == len(question_types)):
        raise ValueError("predictions, answers and question_types differ in length")
    scored = [(float(p == a), t) for p, a, t in zip(predictions, answers, question_types) if a]
    return mean_by_type([s for s, _ in scored], [t for _, t in scored])
