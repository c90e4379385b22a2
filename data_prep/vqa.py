r"""`data_prep vqa`: VQAv2 questions (+ annotations) and COCO images -> VQA shards + answers.json.

    python -m data_prep vqa --questions v2_OpenEnded_mscoco_train2014_questions.json \
        --annotations v2_mscoco_train2014_annotations.json --image-root coco/train2014 --output out/vqa_train

Each sample: jpg, txt = question, json = {question, question_id, image_id, question_type, answer_type,
multiple_choice_answer, answers (10 raw), targets {normalised answer: soft score}}. Without
--annotations (test splits) answers are [] and targets {}. answers.json holds the normalised
multiple-choice answers of the split named train seen at least --min-answer-count times (count desc, then
alphabetical); writing another split into the folder keeps its answers.json.
"""
from __future__ import annotations

import argparse
import os
from collections import Counter
from typing import Iterator

from data_prep.cli_common import add_output_options, make_writer
from data_prep.folder_files import TRAIN_SPLIT, answers_file
from data_prep.jsonio import load_json_file, require_list
from data_prep.records import MISSING_FIELD, ReaderItem, Record, Skip, check_text
from data_prep.vqa_answers import normalize_answer, soft_targets

QUESTIONS_SHAPE = '{"questions": [{"image_id", "question", "question_id"}, ...], "data_subtype": ...}'
ANNOTATIONS_SHAPE = ('{"annotations": [{"question_id", "image_id", "question_type", "answer_type", '
                     '"multiple_choice_answer", "answers": [{"answer", ...} x 10]}, ...]}')
DEFAULT_PATTERN = "COCO_{data_subtype}_{image_id:012d}.jpg"
MISSING_ANNOTATION = "missing_annotation"


def vqa_record(question: dict, annotation: dict | None, *, image_root: str, pattern: str,
               data_subtype: str | None, where: str) -> ReaderItem:
    """One VQAv2 question (+ its annotation) -> Record, or the Skip saying why not."""
    missing = [k for k in ("image_id", "question", "question_id") if k not in question]
    if missing:
        return Skip(MISSING_FIELD, f"{where}: question lacks {missing}")
    text = check_text(question["question"], "question")
    if isinstance(text, Skip):
        return Skip(text.reason, f"{where}: {text.detail}")
    try:
        image = pattern.format(data_subtype=data_subtype, image_id=question["image_id"])
    except (ValueError, KeyError, TypeError) as exc:
        return Skip(MISSING_FIELD, f"{where}: image name from {pattern!r} failed ({exc})")
    meta = {"question": text, "question_id": question["question_id"], "image_id": question["image_id"],
            "question_type": "", "answer_type": "", "answers": [], "targets": {}}
    if annotation is not None:
        answers = annotation.get("answers")
        if not isinstance(answers, list) or not all(isinstance(a, dict) and isinstance(a.get("answer"), str)
                                                    for a in answers):
            return Skip(MISSING_FIELD, f"{where}: annotation answers are not [{{'answer': str}}, ...]")
        raw = [a["answer"] for a in answers]
        meta.update(question_type=str(annotation.get("question_type", "")),
                    answer_type=str(annotation.get("answer_type", "")), answers=raw, targets=soft_targets(raw),
                    multiple_choice_answer=str(annotation.get("multiple_choice_answer", "")))
    return Record(images={"jpg": os.path.join(image_root, image)}, text=text, meta=meta)


def majority_answer(meta: dict) -> str | None:
    """The answer counted for the vocabulary: the normalised multiple-choice answer (else most common)."""
    if meta.get("multiple_choice_answer"):
        return normalize_answer(meta["multiple_choice_answer"])
    if meta["targets"]:
        return max(meta["targets"].items(), key=lambda kv: (kv[1], kv[0]))[0]
    return None


def vqa_items(args: argparse.Namespace, counter: Counter) -> Iterator[ReaderItem]:
    questions_doc = load_json_file(args.questions, QUESTIONS_SHAPE)
    questions = require_list(questions_doc, args.questions, "questions", QUESTIONS_SHAPE)
    data_subtype = args.data_subtype or questions_doc.get("data_subtype")
    if "{data_subtype" in args.image_pattern and not data_subtype:
        raise ValueError(f"{args.questions}: no 'data_subtype' field; pass --data-subtype (e.g. train2014)")
    annotations = None
    if args.annotations:
        doc = load_json_file(args.annotations, ANNOTATIONS_SHAPE)
        annotations = {a.get("question_id"): a for a in require_list(doc, args.annotations, "annotations",
                                                                      ANNOTATIONS_SHAPE) if isinstance(a, dict)}
    name = os.path.basename(args.questions)
    for i, question in enumerate(questions):
        where = f"{name}: questions[{i}]"
        if not isinstance(question, dict):
            yield Skip(MISSING_FIELD, f"{where}: not an object")
            continue
        annotation = None
        if annotations is not None:
            annotation = annotations.get(question.get("question_id"))
            if annotation is None:
                yield Skip(MISSING_ANNOTATION, f"{where}: no annotation for question_id {question.get('question_id')}")
                continue
        item = vqa_record(question, annotation, image_root=args.image_root, pattern=args.image_pattern,
                          data_subtype=data_subtype, where=where)
        if isinstance(item, Record) and (answer := majority_answer(item.meta)):
            counter[answer] += 1
        yield item


def run(args: argparse.Namespace) -> int:
    counter: Counter = Counter()
    with make_writer(args, task="vqa", fields=["jpg", "txt", "json"]) as writer:
        writer.write_split(args.split, vqa_items(args, counter))
        files = answers_file(writer, counter, args.min_answer_count, args.split == TRAIN_SPLIT,
                             "pass --annotations: questions files have no answers")
        writer.finish(files)
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("vqa", help="VQAv2 questions + annotations -> VQA shards",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--questions", required=True, help="VQAv2 questions JSON")
    p.add_argument("--annotations", default=None, help="VQAv2 annotations JSON (omit for test splits)")
    p.add_argument("--image-root", required=True, help="folder of the COCO images")
    p.add_argument("--image-pattern", default=DEFAULT_PATTERN,
                   help="image file under --image-root (default %(default)s)")
    p.add_argument("--data-subtype", default=None, help="e.g. train2014 (default: from the questions file)")
    p.add_argument("--min-answer-count", type=int, default=9,
                   help="answers.json keeps train answers seen at least this often (default %(default)s)")
    p.add_argument("--split", default="train", help="split name of the output (default %(default)s)")
    add_output_options(p)
    p.set_defaults(func=run)
