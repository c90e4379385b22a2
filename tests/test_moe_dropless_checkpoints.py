"""Dropless MoE (``moe.impl: dropless``) after training: merging DeepSpeed's per-expert files into the fused EP=1
tensors, ``init_from`` at another EP size, sparse upcycling from a dense FFN, routing pictures, the gshard ->
dropless conversion (``python -m pipeline.run.convert_moe``), and one tiny EP=2 ZeRO-2 run through the real
launcher serving merge, evaluate, export + predict and init_from."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time

import pytest
import torch
import yaml

from pipeline.config_utils import ConfigError
from pipeline.model.config import ModelConfig, MoEConfig
from pipeline.model.moe import local_experts
from pipeline.run.checkpoint_merge import DENSE_FILE, merge_moe_checkpoint
from tests.launcher import REPO, launcher_env

D, E = 32, 4


def tiny_cfg(**moe) -> ModelConfig:
    return ModelConfig(hidden_size=D, num_heads=2, num_layers=4, num_fusion_layers=2, vocab_size=40,
                       image_size=16, patch_size=8, max_text_len=8,
                       moe=MoEConfig(**{"num_experts": E, "every": 2, "min_capacity": 1, **moe}))


def build(cfg: ModelConfig, seed: int = 0):
    from pipeline.model.vlmoe import VLMoE

    torch.manual_seed(seed)
    with local_experts():
        return VLMoE(cfg).eval()


def batch(seed: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    mask = torch.ones(3, 8, dtype=torch.long)
    mask[0, 5:] = 0  # padding in the text
    mask[2, 3:] = 0
    return {"pixel_values": torch.randn(3, 3, 16, 16, generator=gen),
            "input_ids": torch.randint(5, 40, (3, 8), generator=gen), "attention_mask": mask}


def outputs(model, inputs) -> dict[str, torch.Tensor]:
    """Pooled, CLS and every real token's hidden state (padding rows are never read by a real token)."""
    with torch.no_grad():
        out = model(**inputs)
    return {"pooled": out.pooled, "cls": out.cls, "hidden": out.hidden[out.token_mask.bool()]}


def scale_routers(model, std: float = 2.0) -> None:
    """Routers far from uniform, so that tokens spread over the experts."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "gate.w" in name:
                param.normal_(0, std)


def write_run(folder, state: dict[str, torch.Tensor], recipe: dict, step: int = 4):
    """A run folder whose one checkpoint holds ``state`` as the dense file (what merge_moe_checkpoint reads)."""
    from pipeline.run.run_dir import RunDir

    run = RunDir(folder)
    ckpt = run.checkpoint(run.tag_for(step))
    ckpt.mkdir(parents=True)
    run.recipe_path.write_text(yaml.safe_dump(recipe))
    torch.save({"module": state}, ckpt / DENSE_FILE)
    run.mark_complete(run.tag_for(step), step)
    return ckpt


# ------------------------------------------------------------------------------------------- merge
def write_fused_expert_files(folder, tensors: dict[str, torch.Tensor], layer: int = 0) -> None:
    """DeepSpeed's AutoEP layout: one file per global expert G with ``{prefix}experts.w{1,2,3}.{G}``."""
    experts = next(iter(tensors.values())).shape[0]
    for g in range(experts):
        torch.save({f"{key}.{g}": value[g].clone() for key, value in tensors.items()},
                   folder / f"layer_{layer}_expert_{g}_mp_rank_00_model_states.pt")


def test_merge_stacks_autoep_expert_files_into_fused_tensors(tmp_path):
    torch.manual_seed(0)
    fused = {f"model.blocks.1.ffn.image.experts.{w}": torch.randn(E, *shape)
             for w, shape in (("w1", (6, D)), ("w2", (D, 6)), ("w3", (1, 6 + D)))}
    torch.save({"module": {"model.blocks.1.ffn.image.router.gate.weight": torch.randn(E, D)}}, tmp_path / DENSE_FILE)
    write_fused_expert_files(tmp_path, fused)
    state = merge_moe_checkpoint(tmp_path)
    assert set(state) == {*fused, "model.blocks.1.ffn.image.router.gate.weight"}
    for key, value in fused.items():
        assert torch.equal(state[key], value), key  # global order, not file order

    (tmp_path / "layer_0_expert_2_mp_rank_00_model_states.pt").unlink()
    with pytest.raises(ValueError, match=r"experts \[0, 1, 3\], expected 0..2"):
        merge_moe_checkpoint(tmp_path)
    torch.save({"model.blocks.1.ffn.image.experts.w1.1": fused["model.blocks.1.ffn.image.experts.w1"][1]},
               tmp_path / "layer_0_expert_2_mp_rank_00_model_states.pt")
    with pytest.raises(ValueError, match="appears twice"):
        merge_moe_checkpoint(tmp_path)


# ------------------------------------------------------------------------------------ conversion
@pytest.mark.parametrize("top_k", [1, 2])
def test_converted_gshard_model_equals_it_when_nothing_is_dropped(tmp_path, top_k):
    """Top-1 with an eval capacity factor of E (no drop) and top-2 without 2nd-expert sampling: the dropless
    model built from the converted checkpoint computes what the gshard model does, through the CLI."""
    from pipeline.run.convert_moe import main

    cfg = tiny_cfg(top_k=top_k, eval_capacity_factor=float(E), top2_2nd_expert_sampling=False)
    gshard = build(cfg)
    scale_routers(gshard)
    with torch.no_grad():
        for name, param in gshard.named_parameters():
            if name.endswith("bias") and "experts" in name:
                param.normal_(0, 0.1)  # zero biases would hide a swapped fc1/fc2 bias in w3
    state = {f"model.{k}": v for k, v in gshard.state_dict().items()}
    model_dict = dataclasses.asdict(cfg)
    write_run(tmp_path / "gshard", state, {"task": "vl_pretrain", "model": model_dict})
    assert main([str(tmp_path / "gshard"), "--output", str(tmp_path / "dropless")]) == 0

    saved = yaml.safe_load((tmp_path / "dropless" / "resolved_recipe.yaml").read_text())
    assert saved["model"]["moe"]["impl"] == "dropless"
    converted = merge_moe_checkpoint(tmp_path / "dropless" / "checkpoints" / "step_000004")
    dropless = build(dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, impl="dropless")), seed=5)
    dropless.load_state_dict({k.removeprefix("model."): v for k, v in converted.items()}, strict=True)
    inputs = batch()
    want, got = outputs(gshard, inputs), outputs(dropless, inputs)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6, msg=key)
    kept = torch.stack(list(dropless.moe_stats.kept.values()))
    assert ((kept > 0).sum(1) > 1).all(), kept  # several experts used: a one-expert model proves little


def test_conversion_refuses_pr_moe_and_non_gshard_runs(tmp_path):
    from pipeline.run.convert_moe import convert, dropless_recipe, gshard_to_dropless

    residual = build(tiny_cfg(use_residual=True))
    with pytest.raises(ConfigError, match="use_residual"):
        gshard_to_dropless(residual.state_dict())
    with pytest.raises(ConfigError, match="only a gshard run"):
        dropless_recipe({"model": {"moe": {"impl": "dropless"}}})
    write_run(tmp_path / "run", {}, {"model": {"moe": {"use_residual": True}}})
    with pytest.raises(ConfigError, match="PR-MoE"):
        convert(tmp_path / "run", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_convert_help_is_fast():
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pipeline.run.convert_moe", "--help"], cwd=REPO,
                          env=launcher_env(), capture_output=True, text=True, timeout=30)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0 and "--output" in proc.stdout and "use_residual" in proc.stdout
    assert elapsed < 1.0, f"--help took {elapsed:.2f} s"


# ------------------------------------------------------------------------------------ upcycling
def test_upcycling_copies_the_dense_ffn_into_every_fused_expert():
    from pipeline.model.pretrained import load_upcycled

    dense = build(tiny_cfg(every=0))
    with torch.no_grad():
        for name, param in dense.named_parameters():
            if "ffn" in name and name.endswith("bias"):
                param.normal_(0, 0.1)
    model = build(tiny_cfg(impl="dropless"), seed=3)
    router_before = {k: v.clone() for k, v in model.state_dict().items() if "router" in k}
    fresh = load_upcycled(model, dense.state_dict())
    state, src = model.state_dict(), dense.state_dict()
    fused = [k for k in state if k.endswith("experts.w1")]
    assert fused and all(f"{k[:-len('experts.w1')]}router.gate.weight" in fresh for k in fused)
    for key in fused:
        prefix = key[:-len("experts.w1")]
        for e in range(E):
            assert torch.equal(state[f"{prefix}experts.w1"][e], src[f"{prefix}fc1.weight"])
            assert torch.equal(state[f"{prefix}experts.w2"][e], src[f"{prefix}fc2.weight"])
            assert torch.equal(state[f"{prefix}experts.w3"][e, 0],
                               torch.cat([src[f"{prefix}fc1.bias"], src[f"{prefix}fc2.bias"]]))
    assert all(torch.equal(state[k], v) for k, v in router_before.items())  # routers keep their fresh init


# ------------------------------------------------------------------------------------ routing pictures
def test_routing_recorder_draws_the_dropless_routers_top1_and_no_drops():
    from pipeline import routing_pictures as rp

    model = build(tiny_cfg(impl="dropless", top_k=2))
    scale_routers(model)
    inputs, seen = batch(), {}
    handles = [ffn.register_forward_pre_hook(lambda m, args, name=name: seen.__setitem__(name, args))
               for name, ffn in model.sparse_ffns().items()]
    try:
        calls, spans = rp.RoutingRecorder(model).run(
            {"image": (inputs["pixel_values"],), "text": (inputs["input_ids"], inputs["attention_mask"])})
    finally:
        for handle in handles:
            handle.remove()
    assert calls and all(call.dropless for call in calls)
    for call in calls:
        name = f"blocks.{call.layer}.ffn.{call.key}"
        x_sd, used_s = seen[name][0], seen[name][1]
        choice = model.get_submodule(name).router(x_sd)[1][:, 0]  # top-1 of the top-2, bias 0
        expected = torch.where(used_s.reshape(-1).bool(), choice, torch.full_like(choice, rp.PAD))
        assert call.expert_bn.reshape(-1).tolist() == expected.tolist(), call.name
        assert rp.DROPPED not in call.expert_bn.tolist()
    text = next(c for c in calls if c.key == "text")
    assert (text.expert_bn == rp.PAD).sum() == 8  # the padded text tokens of the batch
    assert len(set(text.expert_bn[text.expert_bn >= 0].tolist())) > 1
    picture, _ = rp.draw_routing(rp.tensor_image(inputs["pixel_values"][0]), calls, spans, ["a"] * 5, 2, "t")
    assert picture.width > 0
    cell = {"tokens": 5, "experts": [5, 0, 0, 0], "dropped": 0}
    stats = {"samples": 1, "num_experts": E, "dropless": True, "calls": {"layer1/image": {
        "tokens": 5, "load": [5, 0, 0, 0], "dropped": 0, "kinds": {"image": {"patches": cell}}}}}
    assert rp.draw_stats(stats).width < rp.draw_stats({**stats, "dropless": False}).width  # no "drop" column


# ------------------------------------------------------------------- one EP=2 ZeRO-2 run through the launcher
@pytest.fixture(scope="module")
def dropless_run(tmp_path_factory, tiny_train_args):
    """(run dir, batch, per-rank engine state and outputs): 2 steps of vl_pretrain with dropless FFNs, EP=2,
    ZeRO-2 fp32, checkpoint at step 2; then that checkpoint loaded into the engine at EP=2 (tests/dist)."""
    from tests.launcher import run_deepspeed
    from tests.train_helpers import run, train_cmd

    base = tmp_path_factory.mktemp("dropless_ckpt")
    out = base / "run"
    extra = ["--set", "model.moe.impl=dropless", "--set", "train.steps=2", "--set", "train.save_every=2",
             "--set", "train.eval_every=0", "--set", "train.routing_images=0", "--set", "optim.lr=0.01"]
    rc = run(train_cmd(out, tiny_train_args, extra, ds_config="ds_configs/zero2_fp32.json"), base / "log.txt")
    assert rc == 0, (base / "log.txt").read_text()[-4000:]
    gen = torch.Generator().manual_seed(0)
    mask = torch.ones(4, 12, dtype=torch.long)
    mask[1, 7:] = 0
    inputs = {"pixel_values": torch.randn(4, 3, 32, 32, generator=gen),
              "input_ids": torch.randint(5, 300, (4, 12), generator=gen), "attention_mask": mask}
    torch.save(inputs, base / "batch.pt")
    run_deepspeed("tests.dist.dropless_engine_state", [str(out), str(base / "batch.pt"), str(base)], timeout=180)
    return out, inputs, [torch.load(base / f"rank{r}.pt") for r in (0, 1)]


@pytest.mark.slow
def test_dropless_ep2_run_merges_evaluates_exports_and_inits_at_another_ep_size(dropless_run, tmp_path):
    from pipeline.hf import VLMoEModel
    from pipeline.predict import main as predict
    from pipeline.run.build import build_model, build_task, load_tokenizer
    from pipeline.run.checkpoint import load_module_weights
    from pipeline.run.eval_loop import load_for_eval
    from pipeline.run.run_dir import RunDir
    from pipeline.tasks import DistInfo
    from tests.test_export import export_cli

    run, inputs, ranks = dropless_run
    folder = run / "checkpoints" / "step_000002"
    assert len(list(folder.glob("layer_*_expert_*_mp_rank_00_model_states.pt"))) == 3 * E  # 3 FFNs x 4 experts
    merged = merge_moe_checkpoint(folder)
    fused = sorted(k for k in merged if k.endswith(("experts.w1", "experts.w2", "experts.w3")))
    assert len(fused) == 9 and all(merged[k].shape[0] == E for k in fused)
    for rank, engine in enumerate(ranks):  # merge == every engine rank's weights, experts as its rows
        assert engine["ep_size"] == [2] and engine["zero_stage"] == 2 and set(engine["ep_rank"].values()) == {rank}
        assert set(engine["state"]) == set(merged)
        for key, value in engine["state"].items():
            want = merged[key][rank * 2:(rank + 1) * 2] if key in fused else merged[key]
            assert torch.equal(value, want), f"rank {rank} {key}"
    assert not torch.equal(merged[fused[0]][0], merged[fused[0]][2])  # the ranks' experts differ

    loaded = load_for_eval(run)  # what pipeline.evaluate runs on: EP=1, one process
    model = loaded.task.model
    assert all(m.ep_size == 1 and m.num_local_experts == E for m in model.sparse_ffns().values())
    got = outputs(model, inputs)
    with torch.no_grad():
        token_mask = model(**inputs).token_mask.bool()
    for rank, engine in enumerate(ranks):  # EP=2 engine (all-to-all between ranks) == EP=1 in one process
        want = {"pooled": engine["pooled"], "cls": engine["cls"], "hidden": engine["hidden"][token_mask]}
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-5, msg=f"rank {rank} {key}")

    exported = tmp_path / "export"
    proc = export_cli("--checkpoint", run, "--output", exported)
    assert proc.returncode == 0, proc.stderr[-4000:]
    hf = VLMoEModel.from_pretrained(exported).eval()
    assert json.loads((exported / "config.json").read_text())["vlmoe"]["moe"]["impl"] == "dropless"
    assert "MoE (dropless)" in (exported / "README.md").read_text()
    with torch.no_grad():
        out = hf(**inputs)
    torch.testing.assert_close(out.pooled, got["pooled"], rtol=1e-5, atol=1e-6)
    assert predict(["--model", str(exported), "--mode", "embed", "--text", "a red circle", "--output",
                    str(tmp_path / "emb.jsonl"), "--no-progress"]) == 0
    row = json.loads((tmp_path / "emb.jsonl").read_text().splitlines()[0])
    assert row and "error" not in row

    # init_from: the EP=2 run into an EP=1 model, and into rank 1 of an EP=2 model (rows 2..3)
    load_module_weights(loaded.task, run)  # strict: any missing / extra / misshapen tensor raises
    recipe = loaded.recipe
    ep2 = dataclasses.replace(recipe, model=dataclasses.replace(
        recipe.model, moe=dataclasses.replace(recipe.model.moe, ep_size=2)))
    task = build_task(ep2, load_tokenizer(recipe.data.tokenizer), DistInfo(), build_model(ep2, 7))
    for ffn in task.model.sparse_ffns().values():
        ffn.ep_group, ffn.ep_rank = "set by the engine", 1  # as set_deepspeed_parallelism leaves rank 1
    assert load_module_weights(task, run) == RunDir.resolve(run)[0].checkpoint("step_000002")
    state = task.state_dict()
    for key in fused:
        assert torch.equal(state[key], merged[key][2:4]), key
    router = next(k for k in merged if k.endswith("router.gate.weight"))
    assert torch.equal(state[router], merged[router])


@pytest.mark.slow
def test_universal_command_prepares_a_resume_at_another_ep_size(dropless_run, tmp_path):
    """``python -m pipeline.run.universal`` on the EP=2 ZeRO-2 run: a new run folder whose checkpoint is
    DeepSpeed's universal one (zero/ with the Adam moments) plus the step's run state and RNG, marked so that
    the resume there loads it with checkpoint.load_universal (and only that resume). A gshard run and a ZeRO-0
    run are refused with the reason. (The resume's arithmetic: tests/dist/moe_dropless.py, universal.)"""
    from pipeline.run.universal import MARKER, refusal, universal_resume_config

    run, _, _ = dropless_run
    out = tmp_path / "ep1"
    proc = subprocess.run([sys.executable, "-m", "pipeline.run.universal", str(run), "--output", str(out)],
                          cwd=REPO, env=launcher_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    folder = out / "checkpoints" / "step_000002"
    for name in ("COMPLETE", MARKER, "run_state.json", "rng/rank_00001.pt", "mp_rank_00_model_states.pt"):
        assert (folder / name).exists(), name
    moments = folder / "zero" / "model.blocks.1.ffn.image.experts.w1" / "exp_avg.pt"
    assert moments.is_file() and (out / "resolved_recipe.yaml").is_file()
    engine = {"zero_optimization": {"stage": 2}, "checkpoint": {"tag_validation": "warn"}}
    assert universal_resume_config(out, engine)["checkpoint"] == {"tag_validation": "warn", "load_universal": True}
    assert universal_resume_config(run, engine) is engine
    again = subprocess.run([sys.executable, "-m", "pipeline.run.universal", str(run), "--output", str(out)],
                           cwd=REPO, env=launcher_env(), capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and "is not an empty folder" in again.stderr
    recipe = yaml.safe_load((run / "resolved_recipe.yaml").read_text())
    gshard = {**recipe, "model": {**recipe["model"], "moe": {**recipe["model"]["moe"], "impl": "gshard"}}}
    assert "per-expert parameters DeepSpeed's universal checkpoint skips" in refusal(gshard, engine)
    assert "ZeRO stage 0" in refusal(recipe, {"zero_optimization": {"stage": 0}})
    assert refusal(recipe, engine) is None
