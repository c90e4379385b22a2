"""Shared set-up of the downstream fine-tune tests: tiny synth data + tokenizer + a tiny vl_pretrain run
(2 CPU ranks, EP=2), made once per pytest session under the session's base temp folder; NLVR2 and
classification fixture data through the real ``data_prep nlvr2`` / ``data_prep classify`` converters."""
from __future__ import annotations

import contextlib
import io
import json
import subprocess
from pathlib import Path

import yaml

from tests.fixtures_data_prep import PALETTE, run_cli, write_image
from tests.launcher import REPO, run_deepspeed

DS_CONFIG = "ds_configs/zero2_fp32.json"
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def word_tokenizer(folder: Path, words: list[str]):
    """A WordPiece tokenizer whose vocabulary is the BERT specials + ``words`` (ids in that order); also
    written as ``folder/vocab.txt``. The vocabulary goes in as a dict: transformers 5.x ignores
    ``vocab_file=`` and would keep only the specials, turning every word into [UNK]."""
    from transformers import BertTokenizerFast

    vocab = [*SPECIAL_TOKENS, *words]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizerFast(vocab={token: i for i, token in enumerate(vocab)}, do_lower_case=True)
    assert len(tok) == len(vocab), f"tokenizer holds {len(tok)} tokens, expected {len(vocab)}"
    for word in words:
        ids = tok(word.upper(), add_special_tokens=False)["input_ids"]
        assert ids == [vocab.index(word)], f"{word!r} encodes to {tok.convert_ids_to_tokens(ids)}"
    return tok


TINY_MODEL = {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "num_fusion_layers": 1, "image_size": 32,
              "patch_size": 8, "vocab_size": 256, "max_text_len": 16,
              "moe": {"num_experts": 2, "every": 2, "top_k": 1, "ep_size": 2, "min_capacity": 1}}
DATA = {"image_size": 32, "text_len": 16, "num_workers": 0, "shuffle_buffer": 50}
FAST_TRAIN = {"eval_every": 0, "save_every": 0, "keep_last": 1, "log_every": 1, "seed": 1, "peak_tflops": 1.0}


def shared_setup(tmp_path_factory) -> dict[str, Path]:
    """{"data", "tokenizer", "pretrain"}: built on first call, reused by later tests of the session."""
    base = tmp_path_factory.getbasetemp() / "downstream_shared"
    paths = {"data": base / "data", "tokenizer": base / "tokenizer", "pretrain": base / "vl_pretrain"}
    if (base / "READY").is_file():
        return paths
    base.mkdir(exist_ok=True)
    assert run_cli("synth", "--output", paths["data"], "--num-samples", 96, "--num-val", 32,
                   "--num-retrieval-test", 16, "--canvas", 32, "--shard-size", 48) == 0
    assert run_cli("tokenizer", "--shards", paths["data"] / "captions", paths["data"] / "vqa",
                   paths["data"] / "retrieval", "--vocab-size", 250, "--output", paths["tokenizer"]) == 0
    recipe = {"task": "vl_pretrain", "model": TINY_MODEL,
              "data": {**DATA, "train": [{"path": str(paths["data"] / "captions"), "split": "train"}],
                       "tokenizer": str(paths["tokenizer"])},
              "objectives": {"itc": 1.0, "itm": 1.0, "mlm": 1.0},
              "batch": {"micro_batch_size": 8}, "train": {**FAST_TRAIN, "steps": 2}}
    train(base / "vl_pretrain.yaml", recipe, paths["pretrain"])
    (base / "READY").write_text("ok\n")
    return paths


def train(recipe_path: Path, recipe: dict, out: Path, timeout: float = 240,
          ds_config: str = DS_CONFIG) -> subprocess.CompletedProcess:
    recipe_path.write_text(yaml.safe_dump(recipe))
    return run_deepspeed("pipeline.train", ["--recipe", str(recipe_path), "--ds-config", ds_config,
                                            "--output-dir", str(out)], timeout=timeout)


def finetune_recipe(name: str, shared: dict[str, Path], train_source: dict, eval_source: dict,
                    steps: int = 3, micro_batch: int = 8, **extra) -> dict:
    """The shipped ``launch/recipes/<name>.yaml`` pointed at the test data, tiny and short."""
    recipe = yaml.safe_load((REPO / "launch" / "recipes" / f"{name}.yaml").read_text())
    recipe.update(init_from=str(shared["pretrain"]), model={"moe": {"ep_size": 2}})
    recipe["data"].update(DATA, train=[train_source], eval=eval_source, tokenizer=str(shared["tokenizer"]))
    recipe["batch"] = {"micro_batch_size": micro_batch}
    recipe["train"] = {**FAST_TRAIN, "steps": steps}
    recipe["schedule"]["warmup_steps"] = 1
    recipe.update(extra)
    return recipe


def evaluate(args: list[str], launcher: bool = False, timeout: float = 180) -> subprocess.CompletedProcess:
    """``pipeline.evaluate ARGS`` in one process, or under the deepspeed launcher (2 ranks). One process runs
    ``pipeline.evaluate.main`` here (what ``python -m pipeline.evaluate`` runs, without an interpreter start
    importing torch and deepspeed again) on one thread as launcher_env's OMP_NUM_THREADS=1; its stdout and
    stderr come back as a CompletedProcess's."""
    if launcher:
        return run_deepspeed("pipeline.evaluate", [*args, "--no-progress"], timeout=timeout)
    import torch

    from pipeline.evaluate import main

    stdout, stderr, threads = io.StringIO(), io.StringIO(), torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            rc = main([str(arg) for arg in args])
    finally:
        torch.set_num_threads(threads)
    proc = subprocess.CompletedProcess(["pipeline.evaluate", *args], rc, stdout.getvalue(), stderr.getvalue())
    assert proc.returncode == 0, f"evaluate failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return proc


def expert_files(run: Path) -> list[str]:
    ckpts = sorted((run / "checkpoints").glob("step_*"))
    return sorted(p.name for p in ckpts[-1].glob("layer_*_expert_*_mp_rank_00_model_states.pt"))


def make_nlvr2_data(root: Path) -> Path:
    """A tiny NLVR2-format corpus (JSON lines + images) converted by ``data_prep nlvr2``; the label says
    whether both images have the same colour, and the sentence says so too."""
    images = root / "images"
    lines = []
    for i in range(24):
        same = i % 2 == 0
        left, right = PALETTE[i % 3], PALETTE[i % 3] if same else PALETTE[(i % 3) + 3]
        stem = f"train-{i // 2}-{i % 2}"
        write_image(images / f"{stem}-img0.png", left, size=(36, 36), fmt="PNG")
        write_image(images / f"{stem}-img1.png", right, size=(36, 36), fmt="PNG")
        lines.append({"sentence": "both images show the same color", "label": "True" if same else "False",
                      "identifier": f"{stem}-0"})
    (root / "train.json").write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = root / "shards"
    assert run_cli("nlvr2", "--input", root / "train.json", "--image-root", images, "--output", out) == 0
    return out


def make_classification_data(root: Path, num_classes: int = 6) -> Path:
    """Class-per-folder image tree (train/val) converted by ``data_prep classify``."""
    tree = root / "tree"
    for split, n in (("train", 6), ("val", 3)):
        for c in range(num_classes):
            for i in range(n):
                write_image(tree / split / f"class{c}" / f"{i}.jpg", PALETTE[c], size=(36, 36))
    out = root / "shards"
    assert run_cli("classify", "--input", tree, "--output", out) == 0
    return out


COLOURS = ("red", "green", "blue", "yellow", "purple", "white")  # the names of PALETTE's colours


def make_gqa_data(root: Path, splits: dict[str, int], colours: tuple[str, ...] = COLOURS[:3]) -> Path:
    """GQA-format question files (one per split) converted by ``data_prep gqa`` into one folder: "what
    colour is the square?" (structural type ``query``, answer the colour) and "is the square red?"
    (``verify``, yes/no). answers.json comes from the split named train."""
    images, out = root / "images", root / "shards"
    for split, n in splits.items():
        questions = {}
        for i in range(n):
            colour = i % len(colours)
            image_id = f"{split}{i}"
            write_image(images / f"{image_id}.jpg", PALETTE[COLOURS.index(colours[colour])], size=(36, 36))
            query = i % 2 == 0
            questions[f"{split}-{i}"] = {
                "imageId": image_id, "question": "what color is it?" if query else "is it red?",
                "answer": colours[colour] if query else ("yes" if colours[colour] == "red" else "no"),
                "fullAnswer": "", "types": {"structural": "query" if query else "verify", "semantic": "attr"}}
        path = root / f"{split}_balanced_questions.json"
        path.write_text(json.dumps(questions))
        assert run_cli("gqa", "--questions", path, "--image-root", images, "--output", out, "--split", split) == 0
    return out


def make_snli_ve_data(root: Path, splits: dict[str, int]) -> Path:
    """SNLI-VE JSON lines (one file per split) converted by ``data_prep snli_ve``: the hypothesis names a
    colour; entailment when it is the image's, contradiction when not, neutral for "a shape"."""
    images, out = root / "images", root / "shards"
    for split, n in splits.items():
        lines = []
        for i in range(n):
            colour, said = i % 3, (i // 3) % 3
            write_image(images / f"{split}{i}.jpg", PALETTE[colour], size=(36, 36))
            label = "neutral" if i % 4 == 3 else ("entailment" if said == colour else "contradiction")
            lines.append({"Flikr30kID": f"{split}{i}.jpg", "pairID": f"{split}-{i}", "gold_label": label,
                          "sentence1": "a picture", "sentence2": "a shape" if label == "neutral" else
                          f"it is {COLOURS[said]}"})
        path = root / f"snli_ve_{split}.jsonl"
        path.write_text("".join(json.dumps(line) + "\n" for line in lines))
        assert run_cli("snli_ve", "--input", path, "--image-root", images, "--output", out, "--split", split) == 0
    return out
