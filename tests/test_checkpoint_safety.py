"""Checkpoint files are read weights-only (a crafted pickle never runs: pipeline.evaluate, the merge behind
init_from, and the RNG file of a resume refuse it, naming the file), and a model whose weights do not all
load is an error, not a score on fresh weights."""
import os

import pytest
import torch

from pipeline.run.checkpoint import rng_state, set_rng_state
from pipeline.run.checkpoint_merge import check_keys, merge_moe_checkpoint, safe_load
from pipeline.config_utils import ConfigError
from pipeline.run.eval_loop import load_for_eval
from pipeline.evaluate import main as evaluate_main
from pipeline.recipe import load_recipe
from tests.conftest import TINY_MODEL_SETS
from tests.launcher import REPO, run_deepspeed
from tests.train_helpers import save_run_folder


class RunsShell:
    """Unpickling it runs ``touch MARKER`` (what a crafted checkpoint does)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def craft(path, marker):
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"module": RunsShell(marker)}, path)


def test_merge_refuses_a_crafted_pickle_without_running_it(tmp_path):
    dense = tmp_path / "ckpt" / "mp_rank_00_model_states.pt"
    craft(dense, tmp_path / "pwned")
    with pytest.raises(ConfigError, match=r"mp_rank_00_model_states\.pt: refused.*posix\.system"):
        merge_moe_checkpoint(tmp_path / "ckpt")
    assert not (tmp_path / "pwned").exists()


def test_rng_state_round_trips_weights_only(tmp_path):
    torch.save(rng_state(), tmp_path / "rank_00000.pt")
    expected = torch.rand(3)
    set_rng_state(safe_load(tmp_path / "rank_00000.pt"))  # what resume reads
    assert torch.equal(torch.rand(3), expected)
    craft(tmp_path / "rank_00001.pt", tmp_path / "pwned")
    with pytest.raises(ConfigError, match="rank_00001.pt: refused"):
        safe_load(tmp_path / "rank_00001.pt")
    assert not (tmp_path / "pwned").exists()


def test_init_from_rule_lets_only_heads_differ():
    check_keys("ckpt", ["heads.answer.weight"], ["heads.itm.fc.bias"], may_differ="heads.")
    with pytest.raises(ConfigError, match=r"1 model tensors missing.*model\.norm\.weight"):
        check_keys("ckpt", ["heads.answer.weight", "model.norm.weight"], [], may_differ="heads.")
    with pytest.raises(ConfigError, match=r"1 checkpoint tensors the model has not.*model\.extra"):
        check_keys("ckpt", [], ["model.extra"], may_differ="heads.")


@pytest.fixture
def vqa_run(tmp_path, synth_data):
    """A run folder as pipeline.train leaves it (resolved recipe, DeepSpeed file layout, COMPLETE), saved
    from a freshly built tiny VQA model in this process."""
    sets = ["init_from=null", f"data.train=[{{path: {synth_data.vqa}, split: train}}]",
            f"data.eval={{path: {synth_data.vqa}, split: val}}", f"data.tokenizer={synth_data.tokenizer}",
            *TINY_MODEL_SETS, "model.moe.ep_size=1"]
    recipe = load_recipe(REPO / "launch/recipes/vqa.yaml", sets)
    run = tmp_path / "run"
    folder = save_run_folder(recipe, run)
    return run, folder


def test_evaluate_refuses_a_model_that_does_not_load_fully(vqa_run):
    run, folder = vqa_run
    load_for_eval(run)  # the complete checkpoint loads
    dense = folder / "mp_rank_00_model_states.pt"
    saved = torch.load(dense, weights_only=True)
    del saved["module"]["model.norm.weight"]
    saved["module"]["heads.unknown.weight"] = torch.zeros(2)
    torch.save(saved, dense)
    with pytest.raises(ConfigError, match=r"missing.*model\.norm\.weight.*heads\.unknown\.weight"):
        load_for_eval(run)


def test_evaluate_cli_refuses_a_crafted_checkpoint(vqa_run, synth_data, capsys):
    run, folder = vqa_run
    marker = run / "pwned"
    craft(folder / "mp_rank_00_model_states.pt", marker)
    rc = evaluate_main(["--checkpoint", str(run), "--task", "vqa", "--data", str(synth_data.vqa),
                        "--split", "val", "--no-progress"])
    assert rc == 2
    assert "mp_rank_00_model_states.pt: refused to load" in capsys.readouterr().err
    assert not marker.exists()


@pytest.mark.slow
def test_resume_and_init_from_are_weights_only_with_real_deepspeed_files(tmp_path):
    proc = run_deepspeed("tests.dist.checkpoint_weights_only", [str(tmp_path)], nproc=2, timeout=300)
    assert proc.stdout.count("WEIGHTS_ONLY_OK") == 2, proc.stdout[-3000:]
