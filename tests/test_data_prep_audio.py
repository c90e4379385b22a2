"""data_prep audio: decoding, mono, soxr resampling, FLAC, bad audio by reason, the readers, determinism.

Fixture files are written here in the official formats (Clotho CSV with quoted commas, AudioCaps CSV,
WavCaps JSON, ESC-50 CSV, generic JSONL) with small clips made by soundfile.
"""
from __future__ import annotations

import io
import json
import random
import re
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from data_prep.cli import main
from data_prep.synth_sounds import make_sound_captions, random_clip
from data_prep.verify import verify
from tests.fixtures_data_prep import REPO, manifest, metas, run_cli, samples, tar_digests
from tests.test_help import PROBE

SOURCE_RATE = 44100


def tone(seconds: float, rate: int = SOURCE_RATE, freq: float = 440.0) -> np.ndarray:
    """Stereo: left 0.8 sin, right 0.4 sin (their mono mean is 0.6 sin)."""
    t = np.arange(round(seconds * rate)) / rate
    wave = np.sin(2 * np.pi * freq * t)
    return np.stack([0.8 * wave, 0.4 * wave], axis=1).astype(np.float32)


def write_clip(path, seconds=1.0, freq=440.0, **kwargs) -> None:
    sf.write(str(path), tone(seconds, freq=freq), SOURCE_RATE, **kwargs)


def decode(flac: bytes) -> tuple[np.ndarray, int]:
    data, rate = sf.read(io.BytesIO(flac), dtype="float32", always_2d=True)
    assert data.shape[1] == 1, "stored audio must be mono"
    return data[:, 0], rate


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """A folder with good stereo 44.1 kHz clips and one clip of every kind of bad audio."""
    root = tmp_path_factory.mktemp("clips")
    for i in range(6):
        write_clip(root / f"good{i}.wav", seconds=1.0 + 0.25 * i, freq=300.0 + 100 * i)
    nan = tone(1.0)
    nan[100, 0] = np.nan
    sf.write(str(root / "nan.wav"), nan, SOURCE_RATE, subtype="FLOAT")
    (root / "zero_bytes.wav").write_bytes(b"")
    sf.write(str(root / "no_frames.wav"), np.zeros((0, 2), np.float32), SOURCE_RATE)
    write_clip(root / "short.wav", seconds=0.05)
    sf.write(str(root / "silent.wav"), np.zeros((SOURCE_RATE, 2), np.float32), SOURCE_RATE)
    write_clip(root / "really_flac.wav", format="FLAC")
    write_clip(root / "really_ogg.wav", format="OGG")
    (root / "truncated.wav").write_bytes((root / "good0.wav").read_bytes()[:30])
    return root


BAD = {"nan.wav": "audio_not_finite", "zero_bytes.wav": "empty_audio", "no_frames.wav": "empty_audio",
       "short.wav": "audio_too_short", "silent.wav": "silent_audio", "really_flac.wav": "audio_extension_mismatch",
       "really_ogg.wav": "audio_extension_mismatch", "truncated.wav": "unreadable_audio",
       "not_there.wav": "missing_file"}


def clotho_csv(path, files) -> None:
    """The official header; captions quoted, with commas (as in Clotho)."""
    lines = ["file_name,caption_1,caption_2,caption_3,caption_4,caption_5"]
    for f in files:
        caps = [f'"{f}: a dog barks, then a car passes"'] + [f'"caption {j} of {f}, with a comma"' for j in range(2, 6)]
        lines.append(",".join([f, *caps]))
    path.write_text("\n".join(lines) + "\n")


def test_clips_are_mono_resampled_and_cropped(clips, tmp_path):
    csv = tmp_path / "clotho_captions_development.csv"
    clotho_csv(csv, ["good0.wav", "good4.wav"])  # 1.0 s and 2.0 s at 44.1 kHz, stereo
    out = tmp_path / "out"
    assert run_cli("clotho", "--captions", csv, "--audio-root", clips, "--output", out, "--max-seconds", 1.5) == 0
    (_, first), (_, second) = samples(out, "train")
    mono, rate = decode(first["flac"])
    assert rate == 16000 and len(mono) == 16000  # 1.0 s resampled to 16 kHz
    assert abs(np.abs(mono[1000:-1000]).max() - 0.6) < 0.01  # the mean of the channels
    spectrum = np.abs(np.fft.rfft(mono))
    assert abs(np.argmax(spectrum) * rate / len(mono) - 300.0) <= 1.0  # pitch kept through resampling
    assert len(decode(second["flac"])[0]) == 24000  # 2.0 s cropped to its first 1.5 s
    meta = json.loads(second["json"])["audio"]["flac"]
    assert meta == {"sample_rate": 16000, "seconds": 1.5, "source_sample_rate": SOURCE_RATE, "source_channels": 2,
                    "source_seconds": 2.0}
    assert verify(str(out))[0] == []


def test_bad_audio_is_counted_by_reason(clips, tmp_path):
    csv = tmp_path / "clotho_captions_evaluation.csv"
    clotho_csv(csv, ["good0.wav", *BAD])
    out = tmp_path / "out"
    assert run_cli("clotho", "--captions", csv, "--audio-root", clips, "--output", out, "--min-written", 0) == 0
    m = manifest(out)
    expected: dict[str, int] = {}
    for reason in BAD.values():
        expected[reason] = expected.get(reason, 0) + 1
    assert m["splits"]["test"]["skipped"] == expected and m["splits"]["test"]["num_samples"] == 1
    assert m["task"] == "audio_retrieval" and m["fields"] == ["flac", "txt", "json"]


def test_clotho_captions_and_workers_give_identical_bytes(clips, tmp_path):
    csv = tmp_path / "clotho_captions_validation.csv"
    files = [f"good{i}.wav" for i in range(6)] + ["silent.wav", "really_ogg.wav"]
    clotho_csv(csv, files)
    outs = []
    for workers in (1, 2):
        outs.append(tmp_path / f"w{workers}")
        assert run_cli("clotho", "--captions", csv, "--audio-root", clips, "--output", outs[-1],
                       "--shard-size", 2, "--workers", workers) == 0
    assert len(tar_digests(outs[0])) == 3 and tar_digests(outs[0]) == tar_digests(outs[1])
    assert (outs[0] / "manifest.json").read_bytes() != b"" and manifest(outs[0])["splits"].keys() == {"val"}
    (key, fields), *_ = samples(outs[0], "val")
    meta = json.loads(fields["json"])
    assert fields["txt"].decode() == "good0.wav: a dog barks, then a car passes"
    assert meta["captions"][1] == "caption 2 of good0.wav, with a comma" and len(meta["captions"]) == 5
    assert meta["audio_id"] == meta["file_name"] == "good0.wav" and meta["key"] == key


def test_malformed_csv_line_stops_with_file_and_line(clips, tmp_path, capsys):
    csv = tmp_path / "clotho_captions_development.csv"
    clotho_csv(csv, ["good0.wav", "good1.wav", "good2.wav"])
    lines = csv.read_text().splitlines()
    lines[2] = 'good1.wav,"an unclosed quote, a dog,b,c,d,e'  # runs on to the end of the file
    csv.write_text("\n".join(lines) + "\n")
    assert main(["clotho", "--captions", str(csv), "--audio-root", str(clips), "--output", str(tmp_path / "o"),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"{csv}:3: " in err and "unclosed quote" in err


def test_audiocaps_groups_captions_by_clip(clips, tmp_path):
    rows = ["audiocap_id,youtube_id,start_time,caption"]
    rows += [f"{100 + j},abc,30,caption {j} of abc" for j in range(5)]
    rows += ['200,xyz,0,"a bell rings, twice"', "300,gone,10,a clip nobody fetched"]
    (tmp_path / "val.csv").write_text("\n".join(rows) + "\n")
    by_youtube, by_cap = tmp_path / "by_youtube", tmp_path / "by_cap"
    by_youtube.mkdir()
    by_cap.mkdir()
    write_clip(by_youtube / "Yabc.wav")
    write_clip(by_youtube / "xyz.flac")
    write_clip(by_cap / "103.wav")
    write_clip(by_cap / "200.wav")
    for root, name_by in ((by_youtube, "youtube_id"), (by_cap, "audiocap_id")):
        out = tmp_path / f"out_{name_by}"
        assert run_cli("audiocaps", "--captions", tmp_path / "val.csv", "--audio-root", root, "--name-by", name_by,
                       "--output", out) == 0
        m = manifest(out)
        assert m["splits"]["val"]["num_samples"] == 2 and m["splits"]["val"]["skipped"] == {"missing_file": 1}
        first, second = metas(out, "val")
        assert first["captions"] == [f"caption {j} of abc" for j in range(5)]
        assert first["audiocap_ids"] == ["100", "101", "102", "103", "104"] and first["youtube_id"] == "abc"
        assert second["captions"] == ["a bell rings, twice"]


def test_audiocaps_missing_clip_says_why(clips, tmp_path, caplog):
    """Clips named by the other --name-by, or left by yt-dlp as .m4a, are not plain missing_file."""
    rows = ["audiocap_id,youtube_id,start_time,caption", "100,abc,30,a dog barks", "200,xyz,0,a bell rings",
            "300,gone,10,a clip nobody fetched"]
    (tmp_path / "val.csv").write_text("\n".join(rows) + "\n")
    root = tmp_path / "clips"
    root.mkdir()
    write_clip(root / "100.wav")  # named by audiocap_id
    (root / "200.m4a").write_bytes(b"not decodable by libsndfile")
    out = tmp_path / "out"
    argv = ["audiocaps", "--captions", tmp_path / "val.csv", "--audio-root", root, "--output", out]
    assert run_cli(*argv) == 2  # every clip missing under youtube_id names
    assert "100.wav is there: pass --name-by audiocap_id" in caplog.text
    caplog.clear()
    assert run_cli(*argv, "--name-by", "audiocap_id", "--min-written", 0) == 0
    assert manifest(out)["splits"]["val"]["skipped"] == {"unreadable_audio": 1, "missing_file": 1}
    assert "200.m4a: soundfile does not read .m4a files" in caplog.text and "ffmpeg -i '200.m4a'" in caplog.text


def test_clotho_audio_root_without_the_clips_names_the_folder(clips, tmp_path, capsys):
    """--audio-root one level above the clips (the folder holding development/) stops and names the folder."""
    (tmp_path / "development").mkdir()
    write_clip(tmp_path / "development" / "a b.wav")
    csv = tmp_path / "clotho_captions_development.csv"
    clotho_csv(csv, ["a b.wav", "gone.wav"])
    argv = ["clotho", "--captions", str(csv), "--output", str(tmp_path / "o"), "--no-progress"]
    assert main([*argv, "--audio-root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"holds none of the 2 clips named in {csv.name}" in err
    assert f"pass --audio-root {tmp_path / 'development'}" in err
    assert main([*argv, "--audio-root", str(tmp_path / "development"), "--min-written", "0"]) == 0


@pytest.mark.parametrize("command", ["clotho", "audiocaps", "esc50"])
def test_audio_progress_bar_has_a_total(command, clips, tmp_path, capsys):
    """The bar says n/N (hours-long AudioCaps/Clotho runs need an ETA)."""
    if command == "clotho":
        clotho_csv(tmp_path / "clotho_captions_validation.csv", ["good0.wav", "good1.wav", "gone.wav"])
        argv = ["--captions", tmp_path / "clotho_captions_validation.csv", "--audio-root", clips]
    elif command == "audiocaps":
        rows = ["audiocap_id,youtube_id,start_time,caption", "1,good0,0,a", "2,good0,0,b", "3,good1,0,c",
                "4,gone,0,d"]
        (tmp_path / "val.csv").write_text("\n".join(rows) + "\n")
        argv = ["--captions", tmp_path / "val.csv", "--audio-root", clips]
    else:
        (tmp_path / "meta").mkdir()
        rows = ["filename,fold,target,category", "good0.wav,1,0,dog", "good1.wav,2,0,dog", "good2.wav,3,0,dog"]
        (tmp_path / "meta" / "esc50.csv").write_text("\n".join(rows) + "\n")
        argv = ["--input", tmp_path, "--audio-root", clips, "--folds", "train=1,3", "test=2"]
    assert main([command, *map(str, argv), "--output", str(tmp_path / "o"), "--min-written", "0"]) == 0
    err = capsys.readouterr().err
    assert re.search(r" 2/2 \[" if command == "esc50" else r" 3/3 \[", err), err  # skipped records count too


def test_esc50_without_input_says_what_to_pass(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["esc50", "--output", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "pass --input ESC-50-master" in capsys.readouterr().err


def test_wavcaps_json(clips, tmp_path):
    root = tmp_path / "flac"
    root.mkdir()
    write_clip(root / "1234.flac")
    write_clip(root / "sb_7.flac")
    doc = {"num_captions_per_audio": 1, "data": [
        {"id": 1234, "caption": "Rain falls on a tin roof.", "duration": 1.0},
        {"id": "Y7", "file_name": "sb_7.flac", "caption": "A bird sings."},
        {"id": "nope", "caption": "Missing clip."},
        {"id": "1234", "caption": "   "}]}
    (tmp_path / "sb_final.json").write_text(json.dumps(doc, indent=1))
    out = tmp_path / "out"
    assert run_cli("wavcaps", "--input", tmp_path / "sb_final.json", "--audio-root", root, "--output", out) == 0
    m = manifest(out)
    assert m["task"] == "audio_pairs"
    assert m["splits"]["train"]["skipped"] == {"missing_file": 1, "empty_caption": 1}
    assert [(x["id"], x["file"], x["caption"]) for x in metas(out)] == [
        (1234, "1234.flac", "Rain falls on a tin roof."), ("Y7", "sb_7.flac", "A bird sings.")]
    assert verify(str(out))[0] == []
    (tmp_path / "bad.json").write_text('{"data": [\n {"id": 1, "caption": "x"},\n {"id": 2 "caption": "y"}\n]}')
    assert run_cli("wavcaps", "--input", tmp_path / "bad.json", "--audio-root", root, "--output", tmp_path / "o") == 2


def test_audio_pairs_jsonl_with_caption_lists(clips, tmp_path):
    lines = [{"audio": "good1.wav", "caption": ["a hum", "a low hum"], "id": "a"},
             {"audio": "good2.wav", "caption": "a whistle"},
             {"audio": "good3.wav"},
             {"audio": "really_flac.wav", "caption": "mislabelled"}]
    table = tmp_path / "pairs.jsonl"
    table.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "out"
    assert run_cli("audio_pairs", "--input", table, "--audio-root", clips, "--output", out) == 0
    m = manifest(out)
    assert m["splits"]["train"]["skipped"] == {"missing_field": 1, "audio_extension_mismatch": 1}
    first, second = metas(out)
    assert first["captions"] == ["a hum", "a low hum"] and first["caption"] == "a hum" and first["id"] == "a"
    assert second["caption"] == "a whistle" and "captions" not in second


def test_esc50_folds_and_classes(clips, tmp_path):
    (tmp_path / "meta").mkdir()
    audio = tmp_path / "audio"
    audio.mkdir()
    rows = ["filename,fold,target,category,esc10,src_file,take"]
    for i, (fold, target, category) in enumerate([(1, 0, "dog"), (2, 1, "rain"), (3, 0, "dog"), (5, 2, "siren")]):
        write_clip(audio / f"{fold}-{i}-A-{target}.wav")
        rows.append(f"{fold}-{i}-A-{target}.wav,{fold},{target},{category},False,{i},A")
    (tmp_path / "meta" / "esc50.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    assert run_cli("esc50", "--input", tmp_path, "--folds", "train=1,2", "test=3", "--output", out) == 0
    m = manifest(out)
    assert m["task"] == "audio_classification" and {s: i["num_samples"] for s, i in m["splits"].items()} == \
        {"train": 2, "test": 1}
    assert json.loads((out / "classes.json").read_text()) == {"classes": ["dog", "rain", "siren"]}
    assert [(f["cls"], json.loads(f["json"])["label_name"]) for _, f in samples(out, "train")] == \
        [(b"0", "dog"), (b"1", "rain")]
    assert verify(str(out))[0] == []
    rows.append("5-9-A-1.wav,5,1,thunder,False,9,A")  # target 1 is "rain" above
    (tmp_path / "meta" / "esc50.csv").write_text("\n".join(rows) + "\n")
    assert run_cli("esc50", "--input", tmp_path, "--output", tmp_path / "o") == 2


def test_synth_sound_world_is_deterministic_with_stated_sizes(tmp_path):
    runs = []
    for workers in (1, 2):
        runs.append(tmp_path / f"w{workers}")
        assert run_cli("synth", "--output", runs[-1], "--num-samples", 10, "--num-val", 2, "--num-retrieval-test", 2,
                       "--num-sounds", 30, "--seed", 3, "--workers", workers, "--shard-size", 100) == 0
    sounds = runs[0] / "sounds"
    assert tar_digests(sounds) == tar_digests(runs[1] / "sounds") and len(tar_digests(sounds)) == 3
    assert run_cli("synth", "--output", tmp_path / "none", "--num-samples", 10, "--num-val", 2,
                   "--num-retrieval-test", 2, "--num-sounds", 0) == 0
    assert not (tmp_path / "none" / "sounds").exists() and (tmp_path / "none" / "captions").is_dir()
    m = manifest(sounds)
    assert m["task"] == "audio_retrieval" and {s: i["num_samples"] for s, i in m["splits"].items()} == \
        {"train": 30, "test": 200}
    test = samples(sounds, "test")
    assert len({json.dumps(json.loads(f["json"])["events"]) for _, f in test}) == 200  # distinct clips
    for _, fields in test:
        meta = json.loads(fields["json"])
        assert len(set(meta["captions"])) == 5 and fields["txt"].decode() == meta["captions"][0]
        assert 1 <= len(meta["events"]) <= 3 and 2.0 <= meta["audio"]["flac"]["seconds"] <= 4.0
        assert meta["audio"]["flac"]["sample_rate"] == 16000
    assert verify(str(sounds))[0] == []


@pytest.mark.parametrize("command, says", [("clotho", "caption_1"), ("audiocaps", "youtube_id"),
                                           ("wavcaps", '"data"'), ("audio_pairs", "Audio(decode=False)"),
                                           ("esc50", "meta/esc50.csv")])
def test_audio_commands_explain_their_files(command, says, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    text = capsys.readouterr().out
    assert exc.value.code == 0 and says in text and "--sample-rate" in text and "--image-size" not in text


SYNONYMS = {"deep": "low", "medium": "mid", "high-pitched": "high", "brief": "short", "sustained": "long",
            "beep": "tone", "buzzing sound": "buzz", "burst of noise": "noise", "noise burst": "noise"}
SINGULAR = {"tones": "tone", "beeps": "beep", "buzzes": "buzz", "buzzing sounds": "buzzing sound",
            "noise bursts": "noise burst", "bursts of noise": "burst of noise"}


def parse_caption(caption: str) -> list[tuple[str, str, str]]:
    """An independent reading of a sound-world caption: the (pitch, timbre, length) of every event, in order."""
    for prefix in ("we hear ", "a clip with ", "the sound of ", "a recording of "):
        caption = caption.removeprefix(prefix)
    events = []
    for phrase in re.split(r", and then |, then | followed by | and after that ", caption):
        count, length, pitch, noun = re.fullmatch(r"(a|one|two|three) (\S+) (\S+) (.+)", phrase).groups()
        noun = SINGULAR.get(noun, noun)
        event = (SYNONYMS.get(pitch, pitch), SYNONYMS.get(noun, noun), SYNONYMS.get(length, length))
        events += [event] * {"a": 1, "one": 1, "two": 2, "three": 3}[count]
    return events


def test_sound_captions_say_exactly_the_events_in_order():
    rng = random.Random(11)
    for _ in range(300):
        clip = random_clip(rng)
        for caption in make_sound_captions(rng, clip, 5):
            assert parse_caption(caption) == list(clip.signature()), caption
        samples_, rate = clip.render()
        assert rate == 16000 and len(samples_) == round(clip.seconds * rate)
        assert all(e.start + e.seconds <= clip.seconds for e in clip.events)


def test_audio_help_imports_no_heavy_module():
    """soundfile and soxr are light; --help of the audio commands must still not load torch & co."""
    proc = subprocess.run([sys.executable, "-c", PROBE, "data_prep", "clotho", "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    result = json.loads(proc.stdout.splitlines()[-1])
    assert result["code"] == 0 and result["heavy"] == [], result
