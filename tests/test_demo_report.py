"""The demo's metrics.json is built from pipeline.evaluate's result files; the precision pick reads CPU flags."""
import json

import pytest

from launch.demo_report import build_report, format_report, main
from pipeline.run.hardware import cpu_flags


def write_eval(folder, name, metrics, baseline_name, baseline):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(
        {"task": name, "metrics": metrics, "baseline": {"name": baseline_name, "metrics": baseline}}))


def test_report_has_the_documented_keys(tmp_path):
    write_eval(tmp_path / "eval", "vqa", {"acc": 0.71, "acc/yes/no": 0.9, "num_scored": 200.0},
               "q-type prior", {"acc": 0.3, "acc/yes/no": 0.5})
    write_eval(tmp_path / "eval", "retrieval", {"t2i_r1": 0.4, "t2i_r5": 0.8, "i2t_r1": 0.5, "rmean": 0.6},
               "chance", {"t2i_r1": 0.005, "t2i_r5": 0.025})
    write_eval(tmp_path / "eval", "captioning", {"cider_d": 1.9, "bleu4": 0.55, "facts_color_shape": 0.8,
                                                 "num_images": 200.0}, "most frequent caption",
               {"cider_d": 0.3, "bleu4": 0.2})
    write_eval(tmp_path / "eval", "audio_retrieval", {"t2a_r5": 0.7, "a2t_r5": 0.6, "t2a_map10": 0.5,
                                                      "num_clips": 200.0}, "chance", {"t2a_r5": 0.025})
    assert main(["--demo-dir", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "metrics.json").read_text())
    assert report["vqa"]["accuracy"] == 0.71 and report["vqa"]["baseline"] == 0.3
    assert "acc" not in report["vqa"]  # renamed to accuracy, not duplicated
    assert report["retrieval"]["t2i_r5"] == 0.8 and report["retrieval"]["baseline_t2i_r5"] == 0.025
    assert report["audio_retrieval"]["t2a_r5"] == 0.7 and report["audio_retrieval"]["baseline"] == 0.025
    assert report["captioning"]["cider_d"] == 1.9 and report["captioning"]["baseline"] == 0.3
    assert report["captioning"]["baseline_bleu4"] == 0.2 and report["captioning"]["bleu4"] == 0.55
    assert list(report) == ["vqa", "retrieval", "captioning", "audio_retrieval"]
    table = format_report(report, tmp_path)
    assert "accuracy" in table and "71.0" in table and "30.0" in table
    assert "captioning       cider_d" in table and "190.0" in table
    assert "audio_retrieval  t2a_r5" in table and "70.0" in table and "2.5" in table


def test_missing_evaluation_is_an_error(tmp_path, capsys):
    write_eval(tmp_path / "eval", "vqa", {"acc": 0.5}, "q-type prior", {"acc": 0.3})
    assert main(["--demo-dir", str(tmp_path)]) == 2
    assert "retrieval.json" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError):
        build_report(tmp_path)


def test_cpu_flags_parse_proc_cpuinfo():
    text = "processor\t: 0\nflags\t\t: fpu avx2 avx512f amx_bf16\nbugs\t: spectre\n"
    assert {"avx2", "amx_bf16"} <= cpu_flags(text)
    assert cpu_flags("processor : 0\n") == set()


def test_heldout_answers_are_matched_to_their_questions_by_id(tmp_path):
    from launch.demo_report import format_heldout, heldout_rows

    assert heldout_rows(tmp_path) == []  # no export stage run: nothing to show
    held = tmp_path / "heldout"
    held.mkdir()
    samples = [{"id": 7, "image": "a.jpg", "question": "which shape is red?",
                "truth": {"answers": ["circle"] * 9 + ["square"]}},
               {"id": 3, "image": "b.jpg", "question": "what color is the cross?", "truth": {"answers": ["blue"]}}]
    answers = [{"id": 3, "answer": "green", "answers": [{"answer": "green", "score": 0.6}], "generated": "blue"},
               {"id": 7, "answer": "circle", "answers": [{"answer": "circle", "score": 0.9}], "generated": "circle"}]
    (held / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    (held / "answers.jsonl").write_text("".join(json.dumps(a) + "\n" for a in answers))
    rows = heldout_rows(tmp_path)
    assert [(r["question"], r["truth"], r["answer"], r["generated"]) for r in rows] == [
        ("what color is the cross?", "blue", "green", "blue"), ("which shape is red?", "circle", "circle", "circle")]
    text = "\n".join(format_heldout(rows, tmp_path))
    assert "which shape is red?  truth: circle  predicted: circle (0.90)" in text
