"""Writer guarantees: worker-count independence, rerun = same manifest, resume after a kill, verify."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import tarfile
import time

import pytest

from data_prep.verify import verify
from tests.fixtures_data_prep import PALETTE, REPO, manifest, run_cli, run_subprocess, tar_digests, write_image


@pytest.fixture(scope="module")
def pairs_input(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs_in")
    rows = []
    for i in range(30):
        write_image(root / "img" / f"{i}.jpg", PALETTE[i % 6], size=(48 + i, 40))
        rows.append({"image": f"img/{i}.jpg", "caption": f"picture number {i}"})
    rows.insert(7, {"image": "img/missing.jpg", "caption": "gone"})
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "pairs.jsonl"


def pairs_args(table, out, *extra):
    return ("pairs", "--input", table, "--output", out, "--image-size", 24, "--shard-size", 7, *extra)


def without_run_details(m: dict) -> dict:
    splits = {name: {**info, "command": None} for name, info in m["splits"].items()}
    return {**m, "command": None, "options": {**m["options"], "output": None}, "splits": splits}


def test_byte_identical_whatever_the_worker_count(pairs_input, tmp_path):
    one, two = tmp_path / "w1", tmp_path / "w2"
    assert run_cli(*pairs_args(pairs_input, one, "--workers", 1)) == 0
    assert run_cli(*pairs_args(pairs_input, two, "--workers", 2)) == 0
    digests = tar_digests(one)
    assert len(digests) == 5 and digests == tar_digests(two)
    assert without_run_details(manifest(one)) == without_run_details(manifest(two))
    assert manifest(one)["skipped"] == {"missing_file": 1}
    # fixed tar headers: no timestamps, no user names
    with tarfile.open(one / "train-000000.tar") as tar:
        assert {(m.mtime, m.uname, m.gname, m.mode) for m in tar.getmembers()} == {(0, "", "", 0o444)}


def test_rerun_reuses_shards_and_writes_the_same_manifest(pairs_input, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_cli(*pairs_args(pairs_input, out)) == 0
    first_manifest, first = (out / "manifest.json").read_bytes(), tar_digests(out)
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    capsys.readouterr()
    assert run_cli(*pairs_args(pairs_input, out)) == 0
    assert "5 finished shards reused" in capsys.readouterr().out
    assert (out / "manifest.json").read_bytes() == first_manifest and tar_digests(out) == first
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")} == mtimes  # not rewritten
    # different options -> shards are rewritten, not reused
    assert run_cli(*pairs_args(pairs_input, out, "--quality", 50)) == 0
    assert tar_digests(out) != first and manifest(out)["options"]["quality"] == 50


def test_verify_fails_on_tampered_output(pairs_input, tmp_path):
    out = tmp_path / "out"
    assert run_cli(*pairs_args(pairs_input, out)) == 0
    assert run_cli("verify", out) == 0
    shard = out / "train-000001.tar"
    data = bytearray(shard.read_bytes())
    data[2000] ^= 0xFF
    shard.write_bytes(bytes(data))
    problems, _ = verify(str(out))
    assert any("sha256 differs" in p for p in problems)
    assert run_cli("verify", out) == 1
    # a shard with a sample removed (and the checksum updated to hide it) fails on counts
    m = manifest(out)
    with tarfile.open(out / "train-000002.tar") as tar:
        members = [(mem, tar.extractfile(mem).read()) for mem in tar.getmembers()][3:]
    with tarfile.open(out / "train-000002.tar", "w") as tar:
        for mem, payload in members:
            tar.addfile(mem, __import__("io").BytesIO(payload))
    del m["checksums"]
    (out / "manifest.json").write_text(json.dumps(m))
    problems, _ = verify(str(out))
    assert any("train-000002.tar: 6 samples, sizes.json says 7" in p for p in problems)


@pytest.mark.slow
def test_resume_after_kill_gives_identical_result(tmp_path):
    args = ("synth", "--num-samples", 400, "--num-val", 40, "--num-retrieval-test", 40, "--seed", 3,
            "--shard-size", 40, "--no-progress")
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "data_prep", *map(str, args), "--output", str(killed)],
                            cwd=REPO, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not (killed / "captions" / "train-000001.tar").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "synth ended before it could be killed"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "captions" / "manifest.json").exists()
    rerun = run_subprocess(*args, "--output", killed)
    assert rerun.returncode == 0, rerun.stderr
    assert "finished shards reused" in rerun.stdout
    fresh = tmp_path / "fresh"
    assert run_cli(*args, "--output", fresh) == 0
    for part in ("captions", "vqa", "retrieval"):
        assert tar_digests(killed / part) == tar_digests(fresh / part)
        assert without_run_details(manifest(killed / part)) == without_run_details(manifest(fresh / part))
        assert not list((killed / part).glob("*.tmp"))
        assert verify(str(killed / part))[0] == []


def test_stale_shards_of_an_earlier_plan_are_removed(pairs_input, tmp_path):
    out = tmp_path / "out"
    assert run_cli(*pairs_args(pairs_input, out)) == 0
    (out / "train-000009.tar.tmp").write_bytes(b"partial")
    assert run_cli("pairs", "--input", pairs_input, "--output", out, "--image-size", 24, "--shard-size", 20) == 0
    assert sorted(p.name for p in out.glob("train-*")) == ["train-000000.tar", "train-000001.tar"]
    assert verify(str(out))[0] == []


def test_shards_read_back_with_webdataset(pairs_input, tmp_path):
    import webdataset as wds

    out = tmp_path / "out"
    assert run_cli(*pairs_args(pairs_input, out)) == 0
    urls = [str(out / name) for name in manifest(out)["splits"]["train"]["shards"]]
    got = list(wds.WebDataset(urls, shardshuffle=False, nodesplitter=None).decode("pil"))
    assert len(got) == 30 and got[0]["__key__"] == "000000000"
    assert got[0]["txt"] == "picture number 0" and got[0]["json"]["key"] == "000000000"
    assert got[0]["jpg"].size[1] == 24
