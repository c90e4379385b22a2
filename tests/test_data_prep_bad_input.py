"""Bad records are skipped and counted by reason; malformed input files stop with file:line."""
from __future__ import annotations

import json
import random

import pytest
from PIL import Image

from data_prep.records import check_text, Skip
from data_prep.verify import verify
from tests.fixtures_data_prep import PALETTE, manifest, metas, run_cli, write_image


def noisy_jpeg(path, size=(96, 96)):
    rng = random.Random(0)
    img = Image.new("RGB", size)
    img.putdata([(rng.randrange(256), rng.randrange(256), rng.randrange(256)) for _ in range(size[0] * size[1])])
    img.save(path, format="JPEG", quality=90)
    return path


@pytest.fixture
def bad_pairs(tmp_path):
    """A JSONL pairs table with one good row and one row per bad-record kind."""
    root = tmp_path / "images"
    write_image(root / "good.jpg", PALETTE[0])
    write_image(root / "good2.jpg", PALETTE[1])
    full = noisy_jpeg(root / "full.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(full[: len(full) // 2])
    (root / "notes.jpg").write_text("this is not an image")
    write_image(root / "huge.jpg", PALETTE[2], size=(200, 150))
    rows = [
        b'{"image": "good.jpg", "caption": "fine"}',
        b'{"image": "missing.jpg", "caption": "no such file"}',
        b'{"image": "truncated.jpg", "caption": "cut in half"}',
        b'{"image": "notes.jpg", "caption": "text file"}',
        b'{"image": "huge.jpg", "caption": "too big"}',
        b'{"image": "good.jpg", "caption": ""}',
        b'{"image": "good.jpg", "caption": "   "}',
        b'{"image": "good.jpg", "caption": "caf\xe9 latin-1"}',
        b'{"image": "good.jpg"}',
        b'{"caption": "no image"}',
        b'',
        b'{"image": "good2.jpg", "caption": "also fine"}',
    ]
    table = tmp_path / "pairs.jsonl"
    table.write_bytes(b"\n".join(rows) + b"\n")
    return table, root


EXPECTED_SKIPS = {"missing_file": 1, "corrupt_image": 1, "not_an_image": 1, "too_many_pixels": 1,
                  "empty_caption": 2, "bad_encoding": 1, "missing_field": 2}


@pytest.mark.parametrize("workers", [1, 2])
def test_bad_records_skipped_and_counted(bad_pairs, tmp_path, capsys, workers):
    table, root = bad_pairs
    out = tmp_path / "out"
    assert run_cli("pairs", "--input", table, "--image-root", root, "--output", out, "--max-pixels", 20000,
                   "--workers", workers, "--min-written", 0) == 0
    m = manifest(out)
    assert m["skipped"] == EXPECTED_SKIPS
    assert [g["caption"] for g in metas(out)] == ["fine", "also fine"]
    assert m["splits"]["train"]["num_samples"] == 2
    summary = capsys.readouterr().out
    assert "wrote 2 samples" in summary and "skipped 9" in summary and "corrupt_image: 1" in summary
    assert verify(str(out))[0] == []


def test_bad_csv_rows_and_non_utf8(tmp_path):
    root = tmp_path / "images"
    write_image(root / "a.jpg", PALETTE[0])
    table = tmp_path / "t.csv"
    table.write_bytes(b"image,caption\na.jpg,good one\na.jpg,\xff\xfe broken\nmissing.jpg,gone\na.jpg,\n")
    out = tmp_path / "out"
    assert run_cli("pairs", "--input", table, "--image-root", root, "--output", out, "--min-written", 0) == 0
    assert manifest(out)["skipped"] == {"bad_encoding": 1, "missing_file": 1, "empty_caption": 1}


def test_check_text_cases():
    assert check_text("  two\n words ", "caption") == "two words"
    assert check_text(b"caf\xc3\xa9", "caption") == "café"
    assert check_text(b"\xff", "caption").reason == "bad_encoding"
    assert check_text(b"\xff".decode("utf-8", "surrogateescape"), "caption").reason == "bad_encoding"
    assert check_text(None, "caption") == Skip("missing_field", "no 'caption'")
    assert check_text(3, "caption").reason == "missing_field"
    assert check_text("\t", "caption").reason == "empty_caption"


def run_expect_error(capsys, *argv) -> str:
    assert run_cli(*argv) == 2
    return capsys.readouterr().err


def test_malformed_jsonl_line_names_file_and_line(tmp_path, capsys):
    table = tmp_path / "pairs.jsonl"
    table.write_text('{"image": "a.jpg", "caption": "x"}\n\n{"image": "b.jpg", caption: y}\n')
    err = run_expect_error(capsys, "pairs", "--input", table, "--output", tmp_path / "out")
    assert "pairs.jsonl:3: expected one JSON object per line" in err
    table.write_text('["not", "an", "object"]\n')
    err = run_expect_error(capsys, "pairs", "--input", table, "--output", tmp_path / "out2")
    assert "pairs.jsonl:1: expected a JSON object" in err


def test_wrong_csv_header_names_file_line_and_columns(tmp_path, capsys):
    table = tmp_path / "pairs.csv"
    table.write_text("img,text\na.jpg,hello\n")
    err = run_expect_error(capsys, "pairs", "--input", table, "--output", tmp_path / "out")
    assert "pairs.csv:1: header ['img', 'text'] lacks column(s) ['image', 'caption']" in err
    table.write_text("image,caption\na.jpg,hello,extra\n")
    err = run_expect_error(capsys, "pairs", "--input", table, "--output", tmp_path / "out2")
    assert "pairs.csv:2: 3 fields, expected 2" in err


def test_malformed_official_files(tmp_path, capsys):
    questions = tmp_path / "questions.json"
    questions.write_text('{"questions": [\n {"image_id": 1, "question": "q?", "question_id": 1},\n oops\n]}')
    err = run_expect_error(capsys, "vqa", "--questions", questions, "--image-root", tmp_path,
                           "--output", tmp_path / "o1")
    assert "questions.json:3: invalid JSON" in err and '"questions"' in err
    questions.write_text('{"qs": []}')
    err = run_expect_error(capsys, "vqa", "--questions", questions, "--image-root", tmp_path,
                           "--output", tmp_path / "o2")
    assert "questions.json: expected a JSON object with a list 'questions'" in err
    karpathy = tmp_path / "dataset_coco.json"
    karpathy.write_text('[{"filename": "x.jpg"}]')
    err = run_expect_error(capsys, "retrieval", "--input", karpathy, "--image-root", tmp_path,
                           "--output", tmp_path / "o3")
    assert "dataset_coco.json: expected a JSON object with a list 'images'" in err
    nlvr2 = tmp_path / "dev.json"
    nlvr2.write_text('{"identifier": "dev-1-0-0", "sentence": "s", "label": "True"}\n{broken\n')
    err = run_expect_error(capsys, "nlvr2", "--input", nlvr2, "--image-root", tmp_path, "--output", tmp_path / "o4")
    assert "dev.json:2: expected one JSON object per line" in err
    err = run_expect_error(capsys, "pairs", "--input", tmp_path / "nope.jsonl", "--output", tmp_path / "o5")
    assert "nope.jsonl" in err and "not found" in err


def test_bad_records_in_official_formats(tmp_path):
    root = tmp_path / "images"
    write_image(root / "dev-1-0-img0.png", PALETTE[0])
    write_image(root / "dev-1-0-img1.png", PALETTE[1])
    lines = [{"identifier": "dev-1-0-0", "sentence": "ok", "label": "True"},
             {"identifier": "dev-1-0-1", "sentence": "bad label", "label": "maybe"},
             {"identifier": "dev-2-0-0", "sentence": "images missing", "label": "False"},
             {"identifier": "nonsense", "sentence": "bad id", "label": "False"},
             {"identifier": "dev-1-0-2", "label": "False"}]
    path = tmp_path / "dev.json"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "out"
    assert run_cli("nlvr2", "--input", path, "--image-root", root, "--output", out, "--split", "dev",
                   "--min-written", 0) == 0
    assert manifest(out)["skipped"] == {"bad_label": 1, "missing_file": 1, "missing_field": 2}
    assert manifest(out)["splits"]["dev"]["num_samples"] == 1

    questions = {"data_subtype": "val2014", "questions": [
        {"image_id": 1, "question": "q1?", "question_id": 11}, {"image_id": 2, "question": "", "question_id": 12},
        {"image_id": 3, "question_id": 13}, {"image_id": 4, "question": "q4?", "question_id": 14}]}
    annotations = {"annotations": [
        {"question_id": 11, "image_id": 1, "question_type": "what", "answer_type": "other",
         "multiple_choice_answer": "x", "answers": [{"answer": "x", "answer_id": 1}] * 10}]}
    write_image(root / "COCO_val2014_000000000001.jpg", PALETTE[2])
    (tmp_path / "q.json").write_text(json.dumps(questions))
    (tmp_path / "a.json").write_text(json.dumps(annotations))
    out = tmp_path / "vqa"
    assert run_cli("vqa", "--questions", tmp_path / "q.json", "--annotations", tmp_path / "a.json",
                   "--image-root", root, "--output", out, "--min-answer-count", 1, "--min-written", 0) == 0
    assert manifest(out)["skipped"] == {"missing_annotation": 3}
    assert manifest(out)["splits"]["train"]["num_samples"] == 1
    out = tmp_path / "vqa_test"
    assert run_cli("vqa", "--questions", tmp_path / "q.json", "--image-root", root, "--output", out,
                   "--split", "test", "--min-written", 0) == 0
    assert manifest(out)["skipped"] == {"empty_caption": 1, "missing_field": 1, "missing_file": 1}


def test_size_and_aspect_filters(tmp_path):
    root = tmp_path / "images"
    write_image(root / "ok.jpg", PALETTE[0], size=(40, 30))
    write_image(root / "tiny.jpg", PALETTE[1], size=(12, 10))
    write_image(root / "banner.jpg", PALETTE[2], size=(120, 20))
    table = tmp_path / "t.jsonl"
    table.write_text("".join(json.dumps({"image": f"{n}.jpg", "caption": n}) + "\n"
                             for n in ("ok", "tiny", "banner")))
    out = tmp_path / "out"
    assert run_cli("pairs", "--input", table, "--image-root", root, "--output", out, "--min-image-size", 16,
                   "--max-aspect-ratio", 3, "--min-written", 0) == 0
    assert manifest(out)["skipped"] == {"too_small": 1, "bad_aspect_ratio": 1}
    assert [m["caption"] for m in metas(out)] == ["ok"]
