"""Session-wide fixtures shared by every test file.

``synth_data``: the built-in synth corpus (``python -m data_prep synth``, small) plus a WordPiece tokenizer
trained on it, made once per pytest session; ``synth_av``: a smaller one with the sound world.
``tiny_train_args``: ``pipeline.train`` arguments for a
tiny, fast model on that data (2 CPU ranks, EP=2).
"""
from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from tests.launcher import REPO, launcher_env

SYNTH_SAMPLES = 240
SYNTH_VAL = 64
SYNTH_RETRIEVAL_TEST = 200  # data_prep synth: retrieval test split has >= 200 images
TOKENIZER_VOCAB = 300


@dataclasses.dataclass(frozen=True)
class SynthData:
    root: Path  # data_prep synth --output folder
    captions: Path  # task pairs; splits train, val
    vqa: Path  # task vqa; splits train, val; answers.json
    retrieval: Path  # task retrieval; splits train, test
    tokenizer: Path  # HF tokenizer folder (AutoTokenizer.from_pretrained)


def _data_prep(*args: object) -> None:
    proc = subprocess.run([sys.executable, "-m", "data_prep", *map(str, args)], cwd=REPO, env=launcher_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"data_prep {args[0]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory: pytest.TempPathFactory) -> SynthData:
    root = tmp_path_factory.mktemp("synth") / "data"
    tokenizer = root.parent / "tokenizer"
    _data_prep("synth", "--output", root, "--num-samples", SYNTH_SAMPLES, "--num-val", SYNTH_VAL,
               "--num-retrieval-test", SYNTH_RETRIEVAL_TEST, "--num-sounds", 0, "--no-progress")
    _data_prep("tokenizer", "--shards", root / "captions", root / "vqa", root / "retrieval",
               "--vocab-size", TOKENIZER_VOCAB, "--output", tokenizer)
    return SynthData(root, root / "captions", root / "vqa", root / "retrieval", tokenizer)


@dataclasses.dataclass(frozen=True)
class SynthAV:
    root: Path  # data_prep synth --output folder, with the sound world
    captions: Path  # image-text pairs; splits train, val
    sounds: Path  # task audio_retrieval; splits train, test (5 captions per clip)
    tokenizer: Path  # trained on the image and the sound captions


SYNTH_AV_SOUNDS = 160
SYNTH_AV_SOUND_TEST = 40


@pytest.fixture(scope="session")
def synth_av(tmp_path_factory: pytest.TempPathFactory) -> SynthAV:
    """A small synth corpus with the sound world (2-4 s FLAC clips at 16 kHz) and a tokenizer that knows
    both worlds' words, for the audio tasks and image+audio mixing."""
    root = tmp_path_factory.mktemp("synth_av") / "data"
    tokenizer = root.parent / "tokenizer"
    _data_prep("synth", "--output", root, "--num-samples", 160, "--num-val", 32, "--num-retrieval-test", 10,
               "--num-sounds", SYNTH_AV_SOUNDS, "--num-sound-test", SYNTH_AV_SOUND_TEST, "--no-progress")
    _data_prep("tokenizer", "--shards", root / "captions", root / "sounds",
               "--vocab-size", TOKENIZER_VOCAB, "--output", tokenizer)
    return SynthAV(root, root / "captions", root / "sounds", tokenizer)


TINY_MODEL_SETS = [
    "model.hidden_size=64", "model.num_heads=2", "model.num_layers=2", "model.num_fusion_layers=1",
    "model.vocab_size=320", "model.moe.num_experts=4", "model.moe.ep_size=2",
]


@pytest.fixture(scope="session")
def tiny_train_args(synth_data: SynthData) -> list[str]:
    """``--set`` arguments: synth captions, tiny model (EP=2), micro-batch 8, frequent logging."""
    sets = [
        f"data.train=[{{path: {synth_data.captions}, split: train}}]",
        f"data.eval={{path: {synth_data.captions}, split: val}}",
        f"data.tokenizer={synth_data.tokenizer}",
        "data.shuffle_buffer=32", "data.num_workers=1",
        *TINY_MODEL_SETS,
        "batch.micro_batch_size=8", "train.log_every=2", "train.peak_tflops=1.0",
        "schedule.warmup_steps=2",
    ]
    return [arg for item in sets for arg in ("--set", item)]
