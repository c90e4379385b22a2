"""pipeline.train through the real deepspeed launcher (2 CPU ranks, gloo, EP=2, ZeRO-2, bf16, tiny model):
training signals (loss, TensorBoard, expert load), checkpoints, exact resume after SIGKILL, SIGTERM."""
import json
import shutil
import signal

import pytest

from tests.train_helpers import (assert_same, complete, kill_group, load_tensors, log_lines, rank_processes,
                                 run, scalars, start, train_cmd, wait_for)
from tests.test_routing_tensorboard import assert_routing_images

pytestmark = pytest.mark.slow

# train.peak_tflops unset: the measurement draws from the global RNG, and a resume must still be exact
RESUMABLE = ["--set", "train.steps=8", "--set", "train.save_every=2", "--set", "train.eval_every=0",
             "--set", "train.keep_last=3", "--set", "optim.lr=0.002", "--set", "train.peak_tflops=null"]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, tiny_train_args):
    """One uninterrupted 8-step run (checkpoints every 2 steps): inspected, and the reference for resume."""
    out = tmp_path_factory.mktemp("full") / "run"
    assert run(train_cmd(out, tiny_train_args, RESUMABLE), out.parent / "log.txt") == 0, \
        (out.parent / "log.txt").read_text()[-4000:]
    return out


def test_vl_pretrain_ep2_zero2_bf16_trains_logs_and_checkpoints(full_run):
    lines = [line for line in log_lines(full_run) if "train/loss" in line]
    assert [line["step"] for line in lines] == [2, 4, 6, 8]
    assert lines[-1]["train/loss"] < lines[0]["train/loss"] - 0.05, lines
    ckpts = sorted(p.name for p in (full_run / "checkpoints").glob("step_*"))
    assert ckpts == ["step_000004", "step_000006", "step_000008"]  # keep_last=3
    final = full_run / "checkpoints" / "step_000008"
    assert (final / "COMPLETE").is_file() and json.loads((final / "run_state.json").read_text())["step"] == 8
    assert (final / "resolved_recipe.yaml").is_file() and (final / "rng" / "rank_00001.pt").is_file()
    assert len(list(final.glob("layer_*_expert_*_mp_rank_00_model_states.pt"))) == 3 * 4  # 3 MoE FFNs x 4
    assert json.loads((full_run / "eval" / "step_000008.json").read_text())["num_samples"] == 64

    tb = scalars(full_run)
    for tag in ["train/loss", "train/itc", "train/itm", "train/mlm", "train/aux_loss", "train/lr",
                "train/grad_norm", "train/samples_per_s", "train/tokens_per_s", "train/mfu",
                "train/data_wait_frac", "eval/itc_loss", "eval/mlm_acc", "eval/i2t_r1"]:
        assert tag in tb, f"{tag} missing from TensorBoard ({sorted(tb)[:20]})"
    entropy = [t for t in tb if t.startswith("moe/") and t.endswith("/entropy")]
    assert {t.split("/")[2] for t in entropy} == {"image", "text", "vl"}
    kept = [t for t in tb if t.startswith("moe/") and t.endswith("/kept_frac")]  # per layer and modality
    assert {t.split("/")[2] for t in kept} == {"image", "text", "vl"} and len(kept) == len(entropy)
    for tag in kept:
        kept_frac, dropped_frac = tb[tag][-1][1], tb[tag.replace("/kept_frac", "/dropped_frac")][-1][1]
        assert 0 < kept_frac <= 1 and kept_frac + dropped_frac == pytest.approx(1.0), tag
    loads = [t for t in tb if t.startswith("moe_load/layer1/image/")]
    assert len(loads) == 4 and abs(sum(tb[t][-1][1] for t in loads) - 1) < 1e-4
    assert 0 < tb["train/data_wait_frac"][-1][1] < 1 and tb["train/lr"][0][1] > 0
    assert_routing_images(full_run, count=4, steps=[8])  # train.routing_images default, the final eval


def test_sigkill_then_resume_auto_matches_uninterrupted_run(full_run, tmp_path, tiny_train_args):
    out = tmp_path / "run"
    proc = start(train_cmd(out, tiny_train_args, RESUMABLE), tmp_path / "log1.txt")
    wait_for(lambda: complete(out, 2), proc, what="first checkpoint")
    kill_group(proc)  # SIGKILL: launcher, ranks, data workers
    assert not complete(out, 8)
    rc = run(train_cmd(out, tiny_train_args, [*RESUMABLE, "--resume", "auto"]), tmp_path / "log2.txt")
    assert rc == 0, (tmp_path / "log2.txt").read_text()[-4000:]
    assert "resumed from" in (tmp_path / "log2.txt").read_text()
    state = json.loads((out / "checkpoints" / "step_000008" / "run_state.json").read_text())
    assert state["step"] == 8 and state["resumes"] == 1 and state["samples_seen"] == 8 * 16
    # evaluation runs on its own seeded RNG stream (MLM masking, ITM negatives): the same weights give the
    # same figures after a resume
    _assert_same_eval(out, full_run, 8)
    ours = load_tensors(out / "checkpoints" / "step_000008")
    reference = load_tensors(full_run / "checkpoints" / "step_000008")
    assert set(ours) == set(reference)
    for name, value in reference.items():  # model, experts, ZeRO optimizer shards, scheduler: bitwise
        if name == "mp_rank_00_model_states.pt":
            for key in ["module", "lr_scheduler", "global_steps", "global_samples"]:
                assert_same(value[key], ours[name][key], f"{name}:{key}")
        elif "optim_states" in name:
            assert_same(value["optimizer_state_dict"], ours[name]["optimizer_state_dict"], name)
        else:
            assert_same(value, ours[name], name)


def test_sigterm_checkpoints_at_step_boundary_and_exits_zero(tmp_path, tiny_train_args):
    out = tmp_path / "run"
    proc = start(train_cmd(out, tiny_train_args, ["--set", "train.steps=500", "--set", "train.eval_every=0",
                                                  "--set", "batch.grad_accum=2",
                                                  "--set", "train.save_every=0"]), tmp_path / "log.txt")
    wait_for(lambda: len(log_lines(out)) >= 1, proc, what="first log line")
    ranks = rank_processes(proc)
    assert len(ranks) == 2
    for rank in ranks:  # what a cluster scheduler does on preemption
        rank.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=400) == 0, (tmp_path / "log.txt").read_text()[-4000:]  # slow when the host is busy
    tags = sorted((out / "checkpoints").glob("step_*"))
    assert len(tags) == 1 and (tags[0] / "COMPLETE").is_file()
    state = json.loads((tags[0] / "run_state.json").read_text())
    step = state["step"]
    assert 2 <= step < 500 and tags[0].name == f"step_{step:06d}"
    assert state["samples_seen"] == step * 8 * 2 * 2  # micro 8 x grad_accum 2 x 2 ranks
    assert "checkpointing at step" in (tmp_path / "log.txt").read_text()


def _assert_same_eval(run_a, run_b, step):
    """Same accuracies exactly; losses to 1e-4: with bitwise-identical weights and the same eval RNG stream,
    a resumed process's losses still differ from an uninterrupted one's in the last bits (1e-6 to 2e-5
    relative, fp32 and bf16; the ITC loss has no randomness at all), while two uninterrupted runs agree."""
    a, b = ({k: v for k, v in json.loads((run / "eval" / f"step_{step:06d}.json").read_text()).items()
             if k != "eval_seconds"} for run in (run_a, run_b))
    assert set(a) == set(b)
    for key in a:
        if key.endswith("_loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-4), key
        else:
            assert a[key] == b[key], key


def test_final_checkpoint_is_saved_before_the_final_eval_which_a_rerun_redoes(full_run, tmp_path,
                                                                              tiny_train_args):
    log = (full_run.parent / "log.txt").read_text()
    assert log.index("saved checkpoint") < log.index("eval step 8"), "evaluated before saving the final step"
    out = tmp_path / "run"
    shutil.copytree(full_run, out)
    (out / "FINISHED").unlink()  # as if the final evaluation had crashed after the final save
    (out / "eval" / "step_000008.json").unlink()
    rc = run(train_cmd(out, tiny_train_args, [*RESUMABLE, "--resume", "auto"]), tmp_path / "log.txt")
    text = (tmp_path / "log.txt").read_text()
    assert rc == 0, text[-4000:]
    assert "nothing to do" in text and (out / "FINISHED").is_file()
    _assert_same_eval(out, full_run, 8)
    assert len((out / "resumes.jsonl").read_text().splitlines()) == 1  # every resume is recorded
