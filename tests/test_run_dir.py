"""RunDir: a run folder's layout, the newest complete checkpoint, and how RUN | RUN/TAG | RUN/checkpoints/TAG
resolve (the one rule behind --resume, init_from, pipeline.evaluate and the pre-launch checks)."""
import pytest

from pipeline.config_utils import ConfigError
from pipeline.run.run_dir import RunDir


def make_checkpoint(run, step, complete=True):
    folder = run / "checkpoints" / RunDir.tag_for(step)
    folder.mkdir(parents=True)
    (folder / "mp_rank_00_model_states.pt").write_bytes(b"")
    (folder / "resolved_recipe.yaml").write_text("task: vqa\n")  # every checkpoint holds the recipe's copy
    if complete:
        (folder / "COMPLETE").write_text(f"{step}\n")
    return folder


def test_the_layout_on_disk_is_the_one_earlier_runs_wrote(tmp_path):
    run = RunDir(tmp_path / "run")
    assert RunDir.tag_for(100) == "step_000100" and RunDir.step_of("step_000100") == 100
    assert run.checkpoint("step_000100") == tmp_path / "run" / "checkpoints" / "step_000100"
    assert (run.recipe_path.name, run.ds_config_path.name) == ("resolved_recipe.yaml", "ds_config.json")
    assert run.eval_path("step_000100") == tmp_path / "run" / "eval" / "step_000100.json"
    assert run.predictions_stem("step_000100") == tmp_path / "run" / "eval" / "step_000100_predictions"
    assert (run.finished_path.name, run.resumes_path.name) == ("FINISHED", "resumes.jsonl")
    make_checkpoint(run.path, 100, complete=False)
    run.mark_complete("step_000100", 100)
    assert (run.checkpoint("step_000100") / "COMPLETE").read_text() == "100\n"
    run.mark_finished(100)
    assert run.finished_path.read_text() == "step_000100\n"  # what launch/common.sh compares with the latest tag
    with pytest.raises(ValueError, match="not a checkpoint tag"):
        RunDir.step_of("latest")


def test_run_tag_and_checkpoint_folder_resolve_to_the_same_complete_checkpoint(tmp_path):
    run = tmp_path / "run"
    for step in (100, 200):
        make_checkpoint(run, step)
    make_checkpoint(run, 300, complete=False)  # killed while writing
    expected = (RunDir(run), "step_000200")
    assert RunDir.resolve(run) == expected  # newest complete; 300 is half-written
    assert RunDir.resolve(str(run)) == expected
    assert RunDir.resolve(run / "checkpoints") == expected
    assert RunDir.resolve(run / "step_000100") == (RunDir(run), "step_000100")  # RUN/TAG
    assert RunDir.resolve(run / "checkpoints" / "step_000100") == (RunDir(run), "step_000100")
    for named in (run, run / "step_000300", run / "checkpoints" / "step_000300", run / "checkpoints"):
        assert RunDir.of(named) == RunDir(run)  # init_from's run: no complete checkpoint needed
    with pytest.raises(FileNotFoundError, match=r"step_000300: not a complete checkpoint \(no COMPLETE marker in"):
        RunDir.resolve(run / "checkpoints" / "step_000300")
    with pytest.raises(FileNotFoundError, match=r"step_000400: not a complete checkpoint \(no folder .*step_000400"):
        RunDir.resolve(run / "step_000400")


def test_tags_order_by_step_number_not_by_name(tmp_path):
    run = tmp_path / "run"
    for step in (1_000_000, 999_999, 20):
        make_checkpoint(run, step)
    assert RunDir(run).complete_tags() == ["step_000020", "step_999999", "step_1000000"]
    assert RunDir.resolve(run) == (RunDir(run), "step_1000000")


def test_a_missing_run_or_one_without_a_complete_checkpoint_names_what_was_looked_for(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as error:
        RunDir.resolve(missing)
    assert str(error.value) == (f"{missing}: no complete checkpoint under {missing / 'checkpoints'} "
                                f"({missing} does not exist)")
    make_checkpoint(tmp_path / "run", 5, complete=False)
    with pytest.raises(FileNotFoundError, match="no complete checkpoint under .*run/checkpoints$"):
        RunDir.resolve(tmp_path / "run")
    assert RunDir(tmp_path / "run").latest() is None and RunDir(missing).complete_tags() == []
    with pytest.raises(ConfigError, match=r"^init_from: .*run is not a run folder \(no resolved_recipe\.yaml"):
        RunDir.of(tmp_path / "run" / "step_000005").saved_recipe("init_from")


def test_a_run_folder_named_like_a_tag_is_a_run(tmp_path):
    run = tmp_path / "step_000001"
    make_checkpoint(run, 7)
    (run / "resolved_recipe.yaml").write_text("task: vqa\n")
    assert RunDir.of(run) == RunDir(run)
    assert RunDir.resolve(run) == (RunDir(run), "step_000007")
    assert RunDir.of(run).saved_recipe("init_from") == run / "resolved_recipe.yaml"


def test_prune_keeps_the_last_k_complete_and_removes_older_incomplete_leftovers(tmp_path):
    run = RunDir(tmp_path / "run")
    for step in (10, 20, 30):
        make_checkpoint(run.path, step)
    make_checkpoint(run.path, 15, complete=False)  # left by a killed run
    make_checkpoint(run.path, 40, complete=False)  # newer than the newest complete: may still be in progress
    run.prune(keep_last=0)  # keeps every complete one
    assert run.complete_tags() == ["step_000010", "step_000020", "step_000030"]
    assert not run.checkpoint("step_000015").exists()
    run.prune(keep_last=2)
    assert run.complete_tags() == ["step_000020", "step_000030"]
    assert sorted(p.name for p in run.checkpoints.iterdir()) == ["step_000020", "step_000030", "step_000040"]
