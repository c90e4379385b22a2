"""launch/*.sh through the real deepspeed launcher on CPU: stages chained by pipeline.sh (EP 2 -> 1), a
2-"node" --no_ssh run on one machine, and wrong configs rejected before anything is launched."""
import json
import re
import subprocess
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY_MODEL_SETS
from tests.launcher import REPO, communicate_or_fail, free_port, launcher_env, run_captured

TINY = [*TINY_MODEL_SETS, "batch.micro_batch_size=8", "train.steps=3", "train.log_every=1",
        "train.eval_every=0", "train.save_every=0", "train.eval_max_batches=1", "data.shuffle_buffer=20",
        "data.num_workers=0", "train.peak_tflops=1.0"]


def sets(items):
    return [arg for item in items for arg in ("--set", item)]


def script(name, args, env=None, timeout=240, **popen):
    full_env = launcher_env(MASTER_PORT=str(free_port()), **(env or {}))
    return run_captured(["bash", str(REPO / "launch" / name), *map(str, args)], timeout, cwd=REPO, env=full_env,
                        **popen)


def final_module(run: Path) -> dict:
    tag = (run / "FINISHED").read_text().strip()
    return torch.load(run / "checkpoints" / tag / "mp_rank_00_model_states.pt", weights_only=False)["module"]


@pytest.mark.slow
def test_pipeline_sh_chains_text_mlm_then_vl_pretrain_with_ep2_then_ep1(synth_data, tmp_path):
    env = {"STAGES": "text_mlm vl_pretrain", "EP_SIZES": "2 1",
           "SETS_vl_pretrain": "freeze=[model.embeddings.text.position]"}
    proc = script("pipeline.sh", [synth_data.root, synth_data.tokenizer, tmp_path, *sets(TINY)], env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    mlm, vl = tmp_path / "text_mlm", tmp_path / "vl_pretrain"
    assert (mlm / "FINISHED").is_file() and (vl / "FINISHED").is_file()
    assert "ep_size: 1" in (vl / "resolved_recipe.yaml").read_text()
    assert "ep_size: 2" in (mlm / "resolved_recipe.yaml").read_text()
    assert f"init_from: {mlm}" in (vl / "resolved_recipe.yaml").read_text()
    assert "initialised weights from" in proc.stderr and "heads.itc" in proc.stderr  # new heads logged
    # the frozen tensor of stage 2 is exactly stage 1's final value: weights really flowed across stages
    key = "model.embeddings.text.position.weight"
    assert torch.equal(final_module(mlm)[key], final_module(vl)[key])
    assert not torch.equal(final_module(mlm)["model.embeddings.text.token.weight"],
                           final_module(vl)["model.embeddings.text.token.weight"])
    rerun = script("pipeline.sh", [synth_data.root, synth_data.tokenizer, tmp_path, *sets(TINY)], env)
    assert rerun.returncode == 0 and rerun.stderr.count("already finished") == 2


@pytest.mark.slow
def test_two_nodes_no_ssh_on_one_machine_train_and_checkpoint(synth_data, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    port = str(free_port())
    run = tmp_path / "run"
    procs = []
    for node in (0, 1):
        env = launcher_env(NNODES="2", GPUS_PER_NODE="1", HOSTFILE=str(hostfile), NO_SSH="1", NODE_RANK=str(node),
                           MASTER_PORT=port, DATA=str(synth_data.captions), TOKENIZER=str(synth_data.tokenizer))
        procs.append(subprocess.Popen(["bash", "launch/pretrain.sh", "launch/recipes/vl_pretrain.yaml", str(run),
                                       *sets(TINY)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, start_new_session=True))
    outputs = [communicate_or_fail(p, 400, f"node {node}")[0] for node, p in enumerate(procs)]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert "--no_ssh --node_rank 1" in outputs[1] and all("dist_world_size=2" in out for out in outputs)
    final = run / "checkpoints" / "step_000003"
    assert (final / "COMPLETE").is_file() and (final / "rng" / "rank_00001.pt").is_file()
    assert json.loads((final / "run_state.json").read_text())["world_size"] == 2


WRONG = [
    (["optim.lrr=0.1"], {}, r"unknown key\(s\) \['lrr'\]"),
    (["batch.global_batch_size=48"], {}, "batch arithmetic.*set batch.grad_accum=3"),
    ([], {"DS_CONFIG": "ds_configs/zero3_bf16.json"}, "ZeRO stage 3 is not supported with DeepSpeed MoE"),
    ([], {"CPU_RANKS": "3"}, "world size 3 is not divisible by model.moe.ep_size=2"),
]


@pytest.mark.parametrize("overrides,env,message", WRONG, ids=["bad_key", "batch", "zero3_moe", "ep_world"])
def test_wrong_configs_fail_before_launch(synth_data, tmp_path, overrides, env, message):
    proc = script("pretrain.sh", ["launch/recipes/vl_pretrain.yaml", tmp_path / "run",
                                  *sets(TINY + [*overrides, "batch.micro_batch_size=8"])],
                  {"DATA": str(synth_data.captions), "TOKENIZER": str(synth_data.tokenizer), **env}, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert re.search(message, proc.stderr), proc.stderr[-3000:]
    assert " -> " not in proc.stderr and not (tmp_path / "run").exists()  # the launcher never started


LAUNCH_ERRORS = [  # (environment, recipe, message): wrong settings of the launch scripts themselves
    ({"NNODES": "2"}, "vl_pretrain", r"NNODES=2 needs HOSTFILE \(see launch/hostfile.example\)"),
    ({"NNODES": "2", "HOSTFILE": "/nonexistent/hosts"}, "vl_pretrain", "HOSTFILE=/nonexistent/hosts: file not found"),
    ({"NNODES": "2", "HOSTFILE": "launch/hostfile.example", "NO_SSH": "1", "NODE_RANK": "2"}, "vl_pretrain",
     r"NODE_RANK=2: expected 0\.\.1"),
    ({"CPU_RANKS": "two"}, "vl_pretrain", "GPUS_PER_NODE=two .*expected a whole number"),
    ({"RESUME": "yes"}, "vl_pretrain", "RESUME=yes: expected auto or never"),
    ({"DS_CONFIG": "ds_configs/nope.json"}, "vl_pretrain",
     r"DS_CONFIG=ds_configs/nope.json: file not found \(ds_configs/ has"),
    ({}, "nope", r"recipe launch/recipes/nope.yaml: file not found \(launch/recipes/ has: .*vl_pretrain.yaml"),
    ({"TOKENIZER": ""}, "vl_pretrain", "DATA=.* needs TOKENIZER"),
]


@pytest.mark.parametrize("env,recipe,message", LAUNCH_ERRORS,
                         ids=["nnodes_no_hostfile", "hostfile_missing", "node_rank", "ranks", "resume", "ds_config",
                              "recipe", "tokenizer"])
def test_launch_script_errors_exit_2_before_launching(synth_data, tmp_path, env, recipe, message):
    proc = script("pretrain.sh", [f"launch/recipes/{recipe}.yaml", tmp_path / "run", *sets(TINY)],
                  {"DATA": str(synth_data.captions), "TOKENIZER": str(synth_data.tokenizer), **env}, timeout=120)
    assert proc.returncode == 2 and re.search(message, proc.stderr), proc.stderr[-3000:]
    assert " -> " not in proc.stderr and not (tmp_path / "run").exists()  # the launcher never started
