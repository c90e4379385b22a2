"""Training on NaN, through the real deepspeed launcher (2 CPU ranks): a learning rate that blows the model
up must stop the run with exit 3, never save or keep a checkpoint of non-finite weights, never prune the
last good checkpoint, and never write FINISHED (so launch/pipeline.sh does not start the next stage)."""
import json

import pytest
import torch

from tests.train_helpers import run, train_cmd

pytestmark = pytest.mark.slow

EXPLODE = ["--set", "train.steps=20", "--set", "train.save_every=1", "--set", "train.keep_last=1",
           "--set", "train.eval_every=0", "--set", "optim.lr=1e5", "--set", "optim.grad_clip=0",
           "--set", "schedule.warmup_steps=0", "--set", "train.nonfinite_budget=2", "--set", "train.log_every=1"]


# zero0_fp32: DeepSpeed reports no gradient norm and applies the NaN update (the guard computes the norm,
# sees the weights go non-finite and stops at once); zero2_fp32: DeepSpeed skips every overflowing step
# by itself, so the run would idle for ever without the budget.
@pytest.mark.parametrize("ds_config", ["ds_configs/zero0_fp32.json", "ds_configs/zero2_fp32.json"])
def test_exploding_run_stops_with_exit_3_and_keeps_its_last_finite_checkpoint(tmp_path, tiny_train_args,
                                                                              ds_config):
    out = tmp_path / "run"
    log = tmp_path / "log.txt"
    rc = run(train_cmd(out, tiny_train_args, EXPLODE, ds_config=ds_config), log)
    text = log.read_text()
    assert rc == 3, text[-4000:]
    assert "pipeline.train: stopped:" in text, text[-4000:]
    assert not (out / "FINISHED").exists()
    tags = sorted(p for p in (out / "checkpoints").glob("step_*") if (p / "COMPLETE").is_file())
    assert tags, "the last good checkpoint was pruned or never written"
    assert int(json.loads((tags[-1] / "run_state.json").read_text())["step"]) < 20
    module = torch.load(tags[-1] / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    bad = [k for k, v in module.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    assert not bad, f"checkpoint {tags[-1].name} holds non-finite tensors: {bad[:5]}"
    first = json.loads((out / "train_log.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1 and 0 < first["train/grad_norm"] < float("inf")  # ZeRO-0 fp32 used to log 0
