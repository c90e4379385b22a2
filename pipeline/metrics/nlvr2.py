"""NLVR2 accuracy and consistency (as in the NLVR2 evaluation script).

Identifiers are ``split-set_id-pair_id-sentence_id``; a unique sentence is ``split-set_id-sentence_id``
(all pair ids); consistency = fraction of unique sentences answered correctly on every one of its pairs.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence


def sentence_key(identifier: str) -> str:
    parts = identifier.split("-")
    if len(parts) < 4:
        raise ValueError(f"NLVR2 identifier {identifier!r} is not split-set_id-pair_id-sentence_id")
    return "-".join([*parts[:-2], parts[-1]])


def nlvr2_metrics(predictions: Sequence[bool], labels: Sequence[bool],
                  identifiers: Sequence[str]) -> dict[str, float]:
    if not (len(predictions) == len(labels) == len(identifiers)):
        raise ValueError("predictions, labels and identifiers differ in length")
    if not predictions:
        return {"acc": 0.0, "consistency": 0.0}
    correct = [bool(p) == bool(y) for p, y in zip(predictions, labels)]
    by_sentence: dict[str, list[bool]] = defaultdict(list)
    for ident, ok in zip(identifiers, correct):
        by_sentence[sentence_key(ident)].append(ok)
    return {
        "acc": sum(correct) / len(correct),
        "consistency": sum(all(v) for v in by_sentence.values()) / len(by_sentence),
    }

