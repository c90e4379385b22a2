"""`data_prep extract`: held-out samples as files + a JSONL that pipeline.predict reads."""
import json
import subprocess
import sys

from data_prep.shards import iter_tar_samples
from pipeline.predict import read_items
from tests.launcher import REPO


def _extract(*args):
    return subprocess.run([sys.executable, "-m", "data_prep", "extract", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def test_first_samples_of_a_split_become_files_and_predict_input(synth_data, tmp_path):
    out = tmp_path / "heldout"
    proc = _extract(synth_data.vqa, "--split", "val", "--limit", 5, "--output", out)
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((synth_data.vqa / "manifest.json").read_text())
    first = manifest["splits"]["val"]["shards"][0]
    expected = [s for _, s in zip(range(5), iter_tar_samples(str(synth_data.vqa / first)))]
    lines = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(lines) == 5
    for line, (key, fields) in zip(lines, expected):
        meta = json.loads(fields["json"])
        assert line["id"] == meta["question_id"] and line["truth"] == meta
        assert line["question"] == (fields["txt"].decode() if "txt" in fields else meta["question"])
        assert (out / line["image"]).read_bytes() == fields["jpg"]  # the shard's bytes, unchanged
    items = read_items(out / "samples.jsonl")
    assert [item["id"] for item in items] == [line["id"] for line in lines]
    assert all(item["image"].is_file() and item["text"] for item in items)


def test_captions_give_text_and_a_short_split_gives_what_it_has(synth_data, tmp_path):
    proc = _extract(synth_data.retrieval, "--split", "test", "--limit", 100000, "--output", tmp_path / "r")
    assert proc.returncode == 0, proc.stderr
    lines = (tmp_path / "r" / "samples.jsonl").read_text().splitlines()
    manifest = json.loads((synth_data.retrieval / "manifest.json").read_text())
    assert len(lines) == manifest["splits"]["test"]["num_samples"]
    first = json.loads(lines[0])
    assert first["text"] == first["truth"]["captions"][0] and "question" not in first


def test_unknown_split_names_the_splits(synth_data, tmp_path):
    proc = _extract(synth_data.vqa, "--split", "test", "--output", tmp_path / "x")
    assert proc.returncode == 2
    assert "no split 'test'" in proc.stderr and "train" in proc.stderr and "val" in proc.stderr
