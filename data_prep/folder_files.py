"""Per-folder files built from the split named `train` only: answers.json (vqa, gqa), classes.json.

A run that writes only another split keeps the folder's file; with none yet, it writes none and says so
in the summary (a trained model's vocabulary always comes from its training folder).
"""
from __future__ import annotations

from collections import Counter

from data_prep.vqa_answers import build_vocabulary
from data_prep.writer import ConversionError, DatasetWriter

TRAIN_SPLIT = "train"


def note_if_absent(writer: DatasetWriter, role: str, name: str) -> None:
    """Say in the summary that `name` was not written because the train split was not."""
    if role not in writer.state.files:
        writer.add_note(f"no {name}: it is built from the split named {TRAIN_SPLIT!r} only; "
                        f"write --split {TRAIN_SPLIT} into this folder to get it")


def answers_file(writer: DatasetWriter, counter: Counter, min_count: int, wrote_train: bool,
                 no_answers_hint: str) -> dict | None:
    """finish() files with answers.json built from the train counts, or None when train was not written.

    Raises ConversionError, before anything is written, when the vocabulary would be empty.
    """
    if not wrote_train:
        note_if_absent(writer, "answers", "answers.json")
        return None
    answers, counts = build_vocabulary(counter, min_count)
    if not answers:
        if not counter:
            raise ConversionError(f"answers.json would be empty: the {TRAIN_SPLIT!r} split has no answers "
                                  f"({no_answers_hint})")
        kept = ", ".join(f">={c}: {sum(n >= c for n in counter.values())}" for c in range(1, max(min_count, 1) + 1))
        raise ConversionError(f"answers.json would be empty: no answer of the {TRAIN_SPLIT!r} split is seen "
                              f"--min-answer-count {min_count} times; answers kept by each count: {kept}. "
                              f"Lower --min-answer-count")
    return {"answers": ("answers.json", {"answers": answers, "counts": counts})}
