"""Data faults (pipeline.data.faults): a training source that fails on every read stops the run with a
clear error (failure budget) instead of spinning for ever; a shard that yields fewer samples than
sizes.json says (tarfile reads a damaged header or a truncation at a header boundary as the end of the
archive) is counted as ``shard_short``; evaluation refuses to report on a split it could not read whole."""
import contextlib
import hashlib
import json
import shutil
import signal
import subprocess
import sys
import tarfile
import time

import pytest
import torch
import yaml

from pipeline.config_utils import ConfigError
from pipeline.data.loader import build_eval_loader, build_train_loader, shard_facts
from pipeline.data.faults import DataFailure, FailureBudget, read_shards
from pipeline.run.distributed import single_process
from pipeline.run.eval_loop import IncompleteEvaluation, require_complete, run_eval, write_eval
from pipeline.recipe import SourceConfig
from tests.conftest import TINY_MODEL_SETS
from tests.finetune_helpers import DATA, FAST_TRAIN
from tests.launcher import REPO, launcher_env, run_deepspeed
from tests.test_data_loading import IdTask, data_cfg, make_source
from tests.train_helpers import run, train_cmd


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail (instead of hanging) when the body runs longer than ``seconds``: the old loader spun for ever."""
    def expire(*_):
        raise TimeoutError(f"still running after {seconds} s")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def with_sizes(folder, split="train"):
    """sizes.json (+ manifest checksums) as data_prep writes them, from the shards as they are now."""
    manifest = json.loads((folder / "manifest.json").read_text())
    names = manifest["splits"][split]["shards"]
    sizes = {name: len({m.name.split(".")[0] for m in tarfile.open(folder / name).getmembers()}) for name in names}
    (folder / "sizes.json").write_text(json.dumps(sizes))
    manifest["checksums"] = {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in names}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def member_offsets(path):
    return [m.offset for m in tarfile.open(path).getmembers()]  # 3 members (jpg, txt, json) per sample


def read_all(folder, budget, split="train", verify=False):
    url = str(folder / f"{split}-000000.tar")
    facts = shard_facts(str(folder), [url], verify)
    return list(read_shards(iter([{"url": url}]), facts, budget)), url


# ------------------------------------------------------------------------------------- budget logic
def test_budget_stops_after_consecutive_failures_and_names_reasons():
    budget = FailureBudget("source S", max_consecutive=5, max_share=None, window=100)
    for _ in range(4):
        budget.fail("FileNotFoundError", "/d/train-000000.tar: [Errno 2] No such file")
    budget.ok()  # a good read resets the run of failures
    for _ in range(4):
        budget.fail("corrupt_image", "/d/train-000001.tar key k7: cannot identify image")
    with pytest.raises(DataFailure) as info:
        budget.fail("FileNotFoundError", "/d/train-000002.tar: [Errno 2] No such file")
    message = str(info.value)
    assert message.startswith("source S") and "5 failed reads in a row (data.max_consecutive_failures=5)" in message
    assert "FileNotFoundError x 5: /d/train-000000.tar" in message  # count and the first example
    assert "corrupt_image x 4: /d/train-000001.tar key k7" in message and "1 samples read" in message


def test_budget_stops_when_failure_share_of_window_is_exceeded():
    budget = FailureBudget("source S", max_consecutive=None, max_share=0.5, window=10)
    for _ in range(30):  # exactly half fail: allowed
        budget.fail("bad", "x")
        budget.ok()
    for _ in range(5):
        budget.ok()
    with pytest.raises(DataFailure, match=r"6 of the last 10 reads failed \(data.max_failure_share=0.5\)"):
        for _ in range(6):
            budget.fail("bad", "x")
    short = FailureBudget("source S", max_consecutive=None, max_share=0.5, window=10)
    short.ok()
    with pytest.raises(DataFailure, match="shard_short x 9"):  # a short shard counts each missing sample
        short.fail("shard_short", "/d/a.tar: read 1 of 10 samples", weight=9)



def test_undecodable_clip_or_image_is_counted_as_corrupt_media():
    """The decode errors of damaged media name the media, not the decoder's exception class."""
    import io

    import numpy as np
    import soundfile as sf

    from pipeline.data.faults import failure_reason
    from pipeline.data.loader import decode_sample

    flac = io.BytesIO()
    sf.write(flac, np.zeros(1600, dtype="float32"), 16000, format="FLAC")
    for name, data in (("flac", b"not audio at all" * 8), ("flac", flac.getvalue()[:-400]),
                       ("wav", b"RIFF" + b"\0" * 60), ("jpg", b"not an image")):
        with pytest.raises(Exception) as info:
            decode_sample({"__key__": "k", name: data}, [name])
        assert failure_reason(info.value) == ("corrupt_image" if name == "jpg" else "corrupt_audio"), info.value
    budget = FailureBudget("source S")
    budget.fail(failure_reason(info.value), "x")
    assert dict(budget.counts) == {"corrupt_image": 1}
    assert failure_reason(FileNotFoundError("/d/train-000000.tar")) == "FileNotFoundError"

def test_data_failure_keeps_only_its_message_when_rebuilt_by_the_dataloader():
    rebuilt = DataFailure("Caught DataFailure in DataLoader worker process 0.\nOriginal Traceback (most recent "
                          "call last):\n  File \"x.py\", line 1\n    raise DataFailure(msg)\n"
                          "pipeline.data.faults.DataFailure: source S: 3 failed reads\n  bad x 3: y\n")
    assert str(rebuilt) == "source S: 3 failed reads\n  bad x 3: y"


# ------------------------------------------------------------------------------ per-shard checks
def test_shard_truncated_at_a_header_boundary_counts_as_short(tmp_path):
    src = with_sizes(make_source(tmp_path / "s", "s", shards=1, per_shard=10))
    shard = src / "train-000000.tar"
    cut = member_offsets(shard)[3 * 6]  # the header of sample 6: tarfile sees a clean end of archive
    shard.write_bytes(shard.read_bytes()[:cut])
    budget = FailureBudget("s")
    samples, url = read_all(src, budget)
    assert len(samples) == 6
    assert budget.counts == {"shard_short": 4} and budget.examples["shard_short"] == f"{url}: read 6 of 10 samples"
    assert budget.shard_problems == {url: {"read": 6, "expected": 10, "reasons": ["shard_short"]}}


def test_damaged_header_in_the_middle_counts_as_short(tmp_path):
    src = with_sizes(make_source(tmp_path / "s", "s", shards=1, per_shard=10))
    shard = src / "train-000000.tar"
    data = bytearray(shard.read_bytes())
    at = member_offsets(shard)[3 * 4 + 1]  # the txt header of sample 4
    data[at:at + 100] = b"\xfe" * 100  # name field garbage: bad checksum, read as the end of the archive
    shard.write_bytes(bytes(data))
    budget = FailureBudget("s")
    samples, url = read_all(src, budget)
    assert len(samples) == 5  # samples 0-3 and sample 4 without its txt/json
    assert budget.counts["shard_short"] == 5 and budget.shard_problems[url]["read"] == 5


def test_verify_checksums_refuses_a_changed_shard_before_reading_it(tmp_path):
    src = with_sizes(make_source(tmp_path / "s", "s", shards=1, per_shard=4))
    shard = src / "train-000000.tar"
    data = bytearray(shard.read_bytes())
    data[-2000] ^= 0xFF  # inside the last sample or the end padding: the count stays the same
    shard.write_bytes(bytes(data))
    samples, _ = read_all(src, FailureBudget("s"))
    assert len(samples) == 4  # without verification the change goes unnoticed
    budget = FailureBudget("s")
    samples, url = read_all(src, budget, verify=True)
    assert samples == [] and budget.counts == {"checksum_mismatch": 1}
    assert budget.examples["checksum_mismatch"].startswith(f"{url}: sha256 ")
    (src / "manifest.json").write_text(json.dumps({**json.loads((src / "manifest.json").read_text()), "checksums": {}}))
    with pytest.raises(ConfigError, match="data.verify_checksums: .* has no sha256 for 1 shard"):
        shard_facts(str(src), [url], True)


# ------------------------------------------------------------------------------ training loader
@pytest.mark.parametrize("damage", ["deleted", "garbage"])
def test_training_source_whose_only_shard_is_lost_stops_within_seconds(tmp_path, damage):
    src = with_sizes(make_source(tmp_path / "s", "s", shards=1, per_shard=8))
    cfg = data_cfg(SourceConfig(str(src)), workers=1)
    loader = build_train_loader(cfg, IdTask(None), 4, rank=0, seed=0)  # plan checks passed
    shard = src / "train-000000.tar"
    if damage == "deleted":
        shard.unlink()
    else:
        shard.write_bytes(b"\x00not a tar" * 300)
    start = time.perf_counter()
    with deadline(60), pytest.raises(DataFailure) as info:
        next(iter(loader))
    assert time.perf_counter() - start < 20
    message = str(info.value)
    assert message.startswith(f"training source data.train[0] ({src}, split train) on rank 0, worker 0: ")
    assert "failed reads in a row (data.max_consecutive_failures=1000)" in message and "Traceback" not in message
    reason = "FileNotFoundError" if damage == "deleted" else "ReadError"
    assert f"{reason} x " in message and str(shard) in message


def test_a_process_whose_loader_failed_exits_instead_of_waiting_for_its_workers(tmp_path):
    """The error escapes to the top level, as in pipeline.train; the worker must not keep the process."""
    src = make_source(tmp_path / "s", "s", shards=1, per_shard=4)
    (src / "train-000000.tar").unlink()
    script = (f"from tests.test_data_loading import IdTask, data_cfg\nfrom pipeline.recipe import SourceConfig\n"
              f"from pipeline.data.loader import build_train_loader\nbatches = iter(build_train_loader(data_cfg("
              f"SourceConfig({str(src)!r}), workers=1), IdTask(None), 4, rank=0, seed=0))\n"
              "next(batches)\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=launcher_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1 and "DataFailure: training source data.train[0]" in proc.stderr, proc.stderr[-3000:]


def test_source_with_empty_shards_is_an_error_not_an_idle_loop(tmp_path):
    src = make_source(tmp_path / "s", "s", shards=1, per_shard=0)  # a valid tar holding nothing
    cfg = data_cfg(SourceConfig(str(src)))
    with deadline(60), pytest.raises(DataFailure, match="shard_empty x 1000"):
        next(iter(build_train_loader(cfg, IdTask(None), 4, rank=0, seed=0)))


# ---------------------------------------------------------------------------------- evaluation
class EchoModule(torch.nn.Module):
    def eval_outputs(self, batch):
        return {"idx": batch["idx"]}


class EchoTask(IdTask):
    def metrics(self, outputs):
        return {"mean_idx": float(outputs["idx"].mean())}

    def predictions(self, outputs):
        return None


def test_eval_on_a_truncated_split_is_marked_incomplete(tmp_path):
    src = with_sizes(make_source(tmp_path / "v", "v", shards=2, per_shard=10, split="val"), split="val")
    shard = src / "val-000001.tar"
    shard.write_bytes(shard.read_bytes()[:member_offsets(shard)[3 * 5]])
    cfg = data_cfg(SourceConfig(str(src)), workers=1)
    loader = build_eval_loader(SourceConfig(str(src), split="val"), cfg, EchoTask(None), 4, 0, 1)
    metrics, _ = run_eval(EchoModule(), EchoTask(None), loader, single_process(), 4)
    assert metrics["num_samples"] == 15 and metrics["num_missing_samples"] == 5
    assert metrics.incomplete["shards"] == {str(shard): {"read": 5, "expected": 10, "reasons": ["shard_short"]}}
    written = json.loads(write_eval(tmp_path / "run", "step_000002", metrics, EchoTask(None), {}).read_text())
    assert written["incomplete"]["missing_samples"] == 5 and written["num_samples"] == 15  # training goes on
    with pytest.raises(IncompleteEvaluation, match=rf"{shard}: read 5 of 10 samples \(shard_short\)"):
        require_complete(metrics, "val")


@pytest.mark.slow
def test_evaluate_exits_nonzero_naming_the_truncated_shard(tmp_path, synth_data):
    """A vqa model (1 step from scratch, one CPU rank) evaluated on a val split with a truncated shard."""
    recipe = yaml.safe_load((REPO / "launch" / "recipes" / "vqa.yaml").read_text())
    sets = dict(item.split("=", 1) for item in TINY_MODEL_SETS)
    model = {key.split(".")[-1]: yaml.safe_load(v) for key, v in sets.items() if not key.startswith("model.moe.")}
    recipe.update(init_from=None, model={**model, "image_size": DATA["image_size"], "patch_size": 8,
                                         "max_text_len": 16, "moe": {"num_experts": 2, "ep_size": 1}})
    recipe["data"].update(DATA, train=[{"path": str(synth_data.vqa), "split": "train"}], eval=None,
                          tokenizer=str(synth_data.tokenizer))
    recipe.update(batch={"micro_batch_size": 8}, train={**FAST_TRAIN, "steps": 1})
    (tmp_path / "vqa.yaml").write_text(yaml.safe_dump(recipe))
    run_deepspeed("pipeline.train", ["--recipe", str(tmp_path / "vqa.yaml"), "--ds-config",
                                     "ds_configs/zero2_fp32.json", "--output-dir", str(tmp_path / "run")], nproc=1)
    data = tmp_path / "vqa"
    shutil.copytree(synth_data.vqa, data)
    shard = data / json.loads((data / "manifest.json").read_text())["splits"]["val"]["shards"][0]
    expected = json.loads((data / "sizes.json").read_text())[shard.name]
    shard.write_bytes(shard.read_bytes()[:member_offsets(shard)[3 * 20]])  # 20 samples left
    proc = subprocess.run([sys.executable, "-m", "pipeline.evaluate", "--checkpoint", str(tmp_path / "run"),
                           "--task", "vqa", "--data", str(data), "--split", "val", "--no-progress"],
                          cwd=REPO, env=launcher_env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"{shard}: read 20 of {expected} samples (shard_short)" in proc.stderr
    assert f"{expected - 20} samples missing" in proc.stderr
    assert not list((tmp_path / "run" / "eval").glob("vqa_val_*.json"))  # no metrics written


@pytest.mark.slow
def test_training_run_whose_only_shard_is_garbage_stops_every_rank_fast(tmp_path, synth_data, tiny_train_args):
    """Through the real launcher (2 CPU ranks): the only training shard is garbage (it exists, so the
    start-up checks pass); the ranks stop with the budget error and the launcher (which returns only once
    every rank has exited) exits non-zero within seconds, not after a busy loop or a hang at exit."""
    data = tmp_path / "captions"
    shutil.copytree(synth_data.captions, data)
    for name in json.loads((data / "manifest.json").read_text())["splits"]["train"]["shards"]:
        (data / name).write_bytes(b"\x00garbage, not a tar" * 500)
    extra = ["--set", f"data.train=[{{path: {data}, split: train}}]", "--set", "data.eval=null",
             "--set", "train.steps=4"]
    log = tmp_path / "log.txt"
    start = time.perf_counter()
    rc = run(train_cmd(tmp_path / "run", tiny_train_args, extra), log, timeout=300)
    elapsed = time.perf_counter() - start
    text = log.read_text()
    assert rc != 0, text[-4000:]
    # the first rank to exhaust its budget reports it; the launcher then stops the other (either may be first)
    assert f"training source data.train[0] ({data}, split train) on rank " in text, text[-4000:]
    assert "failed reads in a row (data.max_consecutive_failures=1000)" in text
    assert "ReadError x " in text and len(text) < 200_000  # not hundreds of thousands of log lines
    assert elapsed < 240, elapsed
