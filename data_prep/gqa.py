r"""`data_prep gqa`: GQA balanced questions + images -> question shards + answers.json.

    python -m data_prep gqa --questions train_balanced_questions.json --image-root gqa/images \
        --output out/gqa --split train
    python -m data_prep gqa --questions testdev_balanced_questions.json --image-root gqa/images \
        --output out/gqa --split testdev

Input: {question_id: {"imageId", "question", "answer", "fullAnswer", "types": {"structural", "semantic",
...}, ...}} (test/challenge files have no "answer"); images {imageId}.jpg under --image-root.
Each sample: jpg, txt = question, json = {question, question_id, image_id, answer (absent without one),
full_answer, question_type (types.structural, else "unknown"), semantic_type (types.semantic if any)}.
answers.json = {"answers", "counts"}: the answers of the split named train seen at least
--min-answer-count times, kept verbatim (GQA answers are already normalised), count desc then alphabetical.
"""
from __future__ import annotations

import argparse
import os
from collections import Counter
from typing import Iterator

from data_prep.cli_common import add_output_options, make_writer
from data_prep.folder_files import TRAIN_SPLIT, answers_file
from data_prep.jsonio import load_json_file
from data_prep.records import MISSING_FIELD, InputFormatError, ReaderItem, Record, Skip, check_text

QUESTIONS_SHAPE = '{question_id: {"imageId", "question", "answer", "fullAnswer", "types": {...}}, ...}'


def gqa_record(question_id: str, question: dict, *, image_root: str, where: str) -> ReaderItem:
    """One GQA question -> Record(jpg, txt, json), or the Skip saying why not."""
    if not isinstance(question, dict):
        return Skip(MISSING_FIELD, f"{where}: not an object")
    missing = [k for k in ("imageId", "question") if k not in question]
    if missing:
        return Skip(MISSING_FIELD, f"{where}: lacks {missing}")
    text = check_text(question["question"], "question")
    if isinstance(text, Skip):
        return Skip(text.reason, f"{where}: {text.detail}")
    image_id = str(question["imageId"]).strip()
    if not image_id:
        return Skip(MISSING_FIELD, f"{where}: empty 'imageId'")
    types = question.get("types") if isinstance(question.get("types"), dict) else {}
    meta = {"question": text, "question_id": str(question_id), "image_id": image_id,
            "full_answer": str(question.get("fullAnswer") or "").strip(),
            "question_type": str(types.get("structural") or "unknown")}
    if types.get("semantic"):
        meta["semantic_type"] = str(types["semantic"])
    if question.get("answer") is not None:
        meta["answer"] = str(question["answer"]).strip()
    return Record(images={"jpg": os.path.join(image_root, f"{image_id}.jpg")}, text=text, meta=meta)


def gqa_items(path: str, image_root: str, counter: Counter) -> Iterator[ReaderItem]:
    doc = load_json_file(path, QUESTIONS_SHAPE)
    if not isinstance(doc, dict):
        raise InputFormatError(path, None, f"expected a JSON object keyed by question id: {QUESTIONS_SHAPE}")
    name = os.path.basename(path)
    for question_id, question in doc.items():
        item = gqa_record(question_id, question, image_root=image_root, where=f"{name}: {question_id}")
        if isinstance(item, Record) and item.meta.get("answer"):
            counter[item.meta["answer"]] += 1
        yield item


def run(args: argparse.Namespace) -> int:
    counter: Counter = Counter()
    with make_writer(args, task="gqa", fields=["jpg", "txt", "json"]) as writer:
        writer.write_split(args.split, gqa_items(args.questions, args.image_root, counter))
        writer.finish(answers_file(writer, counter, args.min_answer_count, args.split == TRAIN_SPLIT,
                                   "test/challenge questions files have no 'answer'"))
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("gqa", help="GQA balanced questions -> question shards + answers.json",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--questions", required=True, help="{split}_balanced_questions.json")
    p.add_argument("--image-root", required=True, help="folder of the GQA images ({imageId}.jpg)")
    p.add_argument("--min-answer-count", type=int, default=1,
                   help="answers.json keeps train answers seen at least this often (default %(default)s)")
    p.add_argument("--split", default="train", help="split name of the output (default %(default)s)")
    add_output_options(p)
    p.set_defaults(func=run)
