"""`data_prep synth`: the built-in shapes-world corpus (captions, VQA, retrieval), deterministic from --seed.

    python -m data_prep synth --output runs/demo/data --num-samples 4000 --seed 0

writes OUTPUT/captions (pairs: train, val), OUTPUT/vqa (vqa: train, val, answers.json),
OUTPUT/retrieval (retrieval: train, test with --num-retrieval-test images x 5 captions) and the sound
world OUTPUT/sounds (audio_retrieval: train with --num-sounds clips, test with --num-sound-test clips,
5 captions each; 2-4 s clips of 1-3 events: pitch low/mid/high, timbre tone/buzz/noise, short/long).
"""
from __future__ import annotations

import argparse
import os
import random
from collections import Counter
from typing import Iterator

from data_prep.cli_common import add_audio_options, add_output_options, make_writer, recorded_options
from data_prep.folder_files import TRAIN_SPLIT
from data_prep.records import Record
from data_prep.synth_sounds import make_sound_captions, random_clip
from data_prep.synth_text import AnswerCycle, answer_vocabulary, make_captions, make_qa
from data_prep.synth_world import random_scene
from data_prep.vqa_answers import build_vocabulary, soft_targets

CAPTIONS_PER_IMAGE = 5
NUM_ANSWERS = 10


def part_rng(seed: int, part: str, split: str) -> random.Random:
    """Independent, reproducible stream per (seed, part, split); str seeds hash with SHA-512."""
    return random.Random(f"synth:{seed}:{part}:{split}")


def caption_records(seed: int, split: str, count: int, canvas: int) -> Iterator[Record]:
    rng = part_rng(seed, "captions", split)
    for i in range(count):
        scene = random_scene(rng, canvas)
        caption = make_captions(rng, scene, 1)[0]
        yield Record(images={"jpg": scene}, text=caption,
                     meta={"image_id": i, "caption": caption, "scene": scene.describe()})


def vqa_records(seed: int, split: str, count: int, canvas: int) -> Iterator[Record]:
    rng = part_rng(seed, "vqa", split)
    cycle = AnswerCycle(rng)
    for i in range(count):
        qa = make_qa(rng, cycle, canvas)
        answers = [qa.answer] * NUM_ANSWERS
        meta = {"question": qa.question, "question_id": i, "image_id": i, "question_type": qa.question_type,
                "answer_type": qa.answer_type, "answers": answers, "targets": soft_targets(answers),
                "scene": qa.scene.describe()}
        yield Record(images={"jpg": qa.scene}, text=qa.question, meta=meta)


def retrieval_records(seed: int, split: str, count: int, canvas: int) -> Iterator[Record]:
    """Images with 5 captions each; scenes are unique within the split so every caption has one match."""
    rng = part_rng(seed, "retrieval", split)
    seen: set = set()
    i = 0
    while i < count:
        scene = random_scene(rng, canvas)
        if scene.signature() in seen:
            continue
        seen.add(scene.signature())
        captions = make_captions(rng, scene, CAPTIONS_PER_IMAGE)
        yield Record(images={"jpg": scene}, text=captions[0],
                     meta={"image_id": i, "filename": f"synth_{split}_{i:06d}.jpg", "captions": captions,
                           "scene": scene.describe()})
        i += 1


def sound_records(seed: int, split: str, count: int, canvas: int) -> Iterator[Record]:
    """Clips with 5 captions each; clips are unique within the split (by what a caption can say)."""
    rng = part_rng(seed, "sounds", split)
    seen: set = set()
    i = 0
    while i < count:
        clip = random_clip(rng)
        if clip.signature() in seen:
            continue
        seen.add(clip.signature())
        captions = make_sound_captions(rng, clip, CAPTIONS_PER_IMAGE)
        yield Record(audio={"flac": clip}, text=captions[0],
                     meta={"audio_id": i, "captions": captions, "events": clip.describe()})
        i += 1


def counting(records: Iterator[Record], counter: Counter) -> Iterator[Record]:
    for record in records:
        counter.update(record.meta["targets"].keys())
        yield record


def run(args: argparse.Namespace) -> int:
    if args.canvas < 16:
        raise ValueError(f"--canvas must be >= 16, got {args.canvas}")
    if args.num_sounds is not None and args.num_sounds < 0:
        raise ValueError(f"--num-sounds must be >= 0, got {args.num_sounds}")
    for name in ("num_samples", "num_val", "num_retrieval_test", "num_sound_test"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.image_size is None:
        args.image_size = args.canvas
    num_val = args.num_val if args.num_val is not None else max(100, args.num_samples // 10)
    options = recorded_options(args)
    parts = {
        "captions": ("pairs", ["jpg", "txt", "json"], caption_records,
                     {"train": args.num_samples, "val": num_val}),
        "vqa": ("vqa", ["jpg", "txt", "json"], vqa_records, {"train": args.num_samples, "val": num_val}),
        "retrieval": ("retrieval", ["jpg", "txt", "json"], retrieval_records,
                      {"train": args.num_samples, "test": args.num_retrieval_test}),
        "sounds": ("audio_retrieval", ["flac", "txt", "json"], sound_records,
                   {"train": args.num_samples if args.num_sounds is None else args.num_sounds,
                    "test": args.num_sound_test}),
    }
    if args.num_sounds == 0:  # no sound world
        del parts["sounds"]
    for part, (task, fields, make_records, splits) in parts.items():
        counter: Counter = Counter()
        with make_writer(args, task=task, fields=fields, out_dir=os.path.join(args.output, part),
                         options={**options, "part": part}) as writer:
            for split, count in splits.items():
                records = make_records(args.seed, split, count, args.canvas)
                counted = task == "vqa" and split == TRAIN_SPLIT
                writer.write_split(split, counting(records, counter) if counted else records, total=count)
            files = None
            if task == "vqa":
                for answer in answer_vocabulary():
                    counter.setdefault(answer, 0)
                answers, counts = build_vocabulary(counter, args.min_answer_count)
                files = {"answers": ("answers.json", {"answers": answers, "counts": counts})}
            writer.finish(files)
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("synth", help="generate the built-in shapes-world corpus",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-samples", type=int, default=4000,
                   help="training samples of each part (captions, vqa, retrieval images) (default %(default)s)")
    p.add_argument("--num-val", type=int, default=None,
                   help="val samples of captions and vqa (default max(100, num_samples/10))")
    p.add_argument("--num-retrieval-test", type=int, default=200,
                   help="retrieval test images, 5 captions each (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="everything is deterministic from it (default %(default)s)")
    p.add_argument("--num-sounds", type=int, default=None,
                   help="sound-world training clips (default: --num-samples; 0 = no sound world)")
    p.add_argument("--num-sound-test", type=int, default=200,
                   help="sound-world test clips, 5 captions each (default %(default)s)")
    p.add_argument("--canvas", type=int, default=64, help="image side in pixels (default %(default)s)")
    p.add_argument("--min-answer-count", type=int, default=0,
                   help="answers.json keeps answers seen this often; 0 keeps every possible synth answer "
                        "(default %(default)s)")
    add_output_options(p, image_size=None, quality=95, shard_size=1000, resize_mode="none")
    add_audio_options(p)
    p.set_defaults(func=run)
