"""Every command on small inputs in the official schemas; `verify` passes on each output."""
from __future__ import annotations

import csv
import io
import json
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_prep.verify import verify
from tests.fixtures_data_prep import PALETTE, jpeg_bytes, manifest, metas, pixel, run_cli, samples, write_image


def assert_verified(out):
    problems, _ = verify(str(out))
    assert problems == []


def close(rgb, expected, tol=40):
    return all(abs(a - b) <= tol for a, b in zip(rgb, expected))


# ---- pairs ---------------------------------------------------------------------------------------
@pytest.fixture
def photo_dir(tmp_path):
    root = tmp_path / "images"
    for i, color in enumerate(PALETTE[:4]):
        write_image(root / f"img{i}.jpg", color, size=(80, 60))
    return root


def test_pairs_jsonl_resizes_and_keeps_order(tmp_path, photo_dir):
    table = tmp_path / "pairs.jsonl"
    table.write_text("".join(json.dumps({"image": f"img{i}.jpg", "caption": f"photo {i}", "id": i}) + "\n"
                             for i in range(4)))
    out = tmp_path / "out"
    assert run_cli("pairs", "--input", table, "--image-root", photo_dir, "--output", out, "--image-size", 32,
                   "--shard-size", 3) == 0
    m = manifest(out)
    assert m["task"] == "pairs" and m["splits"]["train"]["shards"] == ["train-000000.tar", "train-000001.tar"]
    assert m["splits"]["train"]["num_samples"] == 4
    got = samples(out)
    assert [k for k, _ in got] == ["000000000", "000000001", "000000002", "000000003"]
    assert [f["txt"].decode() for _, f in got] == [f"photo {i}" for i in range(4)]
    assert all(close(pixel(f["jpg"]), PALETTE[i]) for i, (_, f) in enumerate(got))
    from PIL import Image
    assert Image.open(io.BytesIO(got[0][1]["jpg"])).size == (43, 32)  # shorter side 32, aspect kept
    assert metas(out)[2] == {"key": "000000002", "caption": "photo 2", "source": "pairs.jsonl:3", "id": 2,
                             "image": "img2.jpg"}
    assert json.loads((out / "sizes.json").read_text()) == {"train-000000.tar": 3, "train-000001.tar": 1}
    assert_verified(out)


def test_pairs_csv_custom_columns_and_center_crop(tmp_path, photo_dir):
    table = tmp_path / "pairs.csv"
    with open(table, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["url", "text", "path"])
        w.writerows([[f"http://x/{i}", f"a, quoted \"caption\" {i}", f"img{i}.jpg"] for i in range(3)])
    out = tmp_path / "out"
    assert run_cli("pairs", "--input", table, "--image-root", photo_dir, "--image-column", "path",
                   "--caption-column", "text", "--resize-mode", "center_crop", "--image-size", 24,
                   "--output", out) == 0
    got = metas(out)
    assert [g["caption"] for g in got] == [f'a, quoted "caption" {i}' for i in range(3)]
    assert got[1]["url"] == "http://x/1"
    from PIL import Image
    assert Image.open(io.BytesIO(samples(out)[0][1]["jpg"])).size == (24, 24)
    assert_verified(out)


def test_pairs_parquet_with_bytes_and_hf_struct(tmp_path):
    images = [jpeg_bytes(PALETTE[0]), {"bytes": jpeg_bytes(PALETTE[1]), "path": None}]
    table = pa.table({"image": pa.array([images[0], images[1]["bytes"]], pa.binary()),
                      "caption": ["red", "green"]})
    pq.write_table(table, tmp_path / "t.parquet")
    struct = pa.table({"image": [images[1]], "caption": ["green"]})
    pq.write_table(struct, tmp_path / "s.parquet")
    for name, expected in [("t.parquet", [PALETTE[0], PALETTE[1]]), ("s.parquet", [PALETTE[1]])]:
        out = tmp_path / name.replace(".", "_")
        assert run_cli("pairs", "--input", tmp_path / name, "--output", out) == 0
        assert [close(pixel(f["jpg"]), e) for (_, f), e in zip(samples(out), expected)] == [True] * len(expected)
        assert_verified(out)


def test_pairs_imagefolder_metadata(tmp_path):
    root = tmp_path / "folder"
    write_image(root / "a" / "x.png", PALETTE[2], fmt="PNG")
    write_image(root / "y.jpg", PALETTE[3])
    (root / "metadata.jsonl").write_text(json.dumps({"file_name": "a/x.png", "caption": "blue"}) + "\n" +
                                         json.dumps({"file_name": "y.jpg", "caption": "yellow"}) + "\n")
    out = tmp_path / "out"
    assert run_cli("pairs", "--input", root, "--output", out) == 0
    got = samples(out)
    assert [f["txt"] for _, f in got] == [b"blue", b"yellow"]
    assert close(pixel(got[0][1]["jpg"]), PALETTE[2])
    assert_verified(out)


def write_img2dataset_shard(path, entries):
    """An img2dataset-style tar: 9-digit keys, .jpg/.txt/.json per sample."""
    with tarfile.open(path, "w") as tar:
        for key, fields in entries:
            for ext, data in fields.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_pairs_reshards_img2dataset_output(tmp_path):
    src = tmp_path / "i2d"
    src.mkdir()
    for shard in range(2):
        entries = []
        for i in range(3):
            key = f"{shard * 10000 + i:09d}"
            meta = {"url": f"http://x/{key}", "key": key, "status": "success", "caption": f"c{key}"}
            entries.append((key, {"jpg": jpeg_bytes(PALETTE[i], (64, 48)), "txt": f"c{key}".encode(),
                                  "json": json.dumps(meta).encode()}))
        write_img2dataset_shard(src / f"{shard:05d}.tar", entries)
        (src / f"{shard:05d}.parquet").write_bytes(b"")  # img2dataset leaves these beside the tars
    out = tmp_path / "out"
    assert run_cli("pairs", "--input", src, "--output", out, "--image-size", 16, "--shard-size", 4) == 0
    got = metas(out)
    assert [g["caption"] for g in got] == ["c000000000", "c000000001", "c000000002", "c000010000",
                                           "c000010001", "c000010002"]
    assert got[3]["source"] == "00001.tar/000010000"
    assert manifest(out)["splits"]["train"]["num_samples"] == 6
    assert_verified(out)


# ---- vqa -----------------------------------------------------------------------------------------
def vqav2_files(tmp_path, n=4, annotated=True):
    images = tmp_path / "train2014"
    questions, annotations = [], []
    for i in range(n):
        image_id = 100 + i
        write_image(images / f"COCO_train2014_{image_id:012d}.jpg", PALETTE[i % 6])
        questions.append({"image_id": image_id, "question": f"What color is thing {i}?", "question_id": 1000 + i})
        raw = ["Red"] * 4 + ["red."] * 2 + ["blue"] * 3 + ["two"] if i % 2 == 0 else ["yes"] * 10
        annotations.append({"question_id": 1000 + i, "image_id": image_id, "question_type": "what color is the",
                            "answer_type": "other" if i % 2 == 0 else "yes/no",
                            "multiple_choice_answer": "red" if i % 2 == 0 else "yes",
                            "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": j + 1}
                                        for j, a in enumerate(raw)]})
    qf = tmp_path / "v2_OpenEnded_mscoco_train2014_questions.json"
    qf.write_text(json.dumps({"info": {}, "task_type": "Open-Ended", "data_type": "mscoco",
                              "license": {}, "data_subtype": "train2014", "questions": questions}))
    af = tmp_path / "v2_mscoco_train2014_annotations.json"
    af.write_text(json.dumps({"info": {}, "license": {}, "data_subtype": "train2014",
                              "annotations": annotations if annotated else []}))
    return qf, af, images


def test_vqa_official_schema(tmp_path):
    qf, af, images = vqav2_files(tmp_path)
    out = tmp_path / "out"
    assert run_cli("vqa", "--questions", qf, "--annotations", af, "--image-root", images, "--output", out,
                   "--min-answer-count", 2) == 0
    got = metas(out)
    assert [g["question_id"] for g in got] == [1000, 1001, 1002, 1003]
    first = got[0]
    assert first["targets"] == {"2": 0.3, "blue": 0.9, "red": 1.0}
    assert len(first["answers"]) == 10 and first["answer_type"] == "other" and first["image_id"] == 100
    assert samples(out)[0][1]["txt"] == b"What color is thing 0?"
    assert json.loads((out / "answers.json").read_text()) == {"answers": ["red", "yes"], "counts": [2, 2]}
    assert manifest(out)["files"] == {"answers": "answers.json"}
    assert_verified(out)


def test_vqa_test_split_without_annotations(tmp_path, capsys):
    qf, _, images = vqav2_files(tmp_path, n=2)
    out = tmp_path / "out"
    assert run_cli("vqa", "--questions", qf, "--image-root", images, "--output", out, "--split", "test") == 0
    got = metas(out, "test")
    assert [(g["answers"], g["targets"]) for g in got] == [([], {}), ([], {})]
    # answers.json comes from a train split only: none here, and the summary says so
    assert not (out / "answers.json").exists() and manifest(out)["files"] == {}
    assert "no answers.json: it is built from the split named 'train' only" in capsys.readouterr().out
    assert_verified(out)


# ---- retrieval -------------------------------------------------------------------------------------
def karpathy_file(tmp_path, splits):
    images, root = [], tmp_path / "imgs"
    for i, split in enumerate(splits):
        write_image(root / "val2014" / f"COCO_val2014_{i:012d}.jpg", PALETTE[i % 6])
        images.append({"filepath": "val2014", "filename": f"COCO_val2014_{i:012d}.jpg", "imgid": i,
                       "split": split, "cocoid": 500 + i, "sentids": [5 * i + j for j in range(5)],
                       "sentences": [{"tokens": ["a", "b"], "raw": f"Image {i} caption {j}.", "imgid": i,
                                      "sentid": 5 * i + j} for j in range(5)]})
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps({"images": images, "dataset": "coco"}))
    return path, root


@pytest.mark.parametrize("restval, expected", [
    ("train", {"train": [0, 3], "val": [1], "test": [2, 4]}),
    ("keep", {"train": [0], "val": [1], "test": [2, 4], "restval": [3]}),
    ("drop", {"train": [0], "val": [1], "test": [2, 4]}),
])
def test_retrieval_karpathy_splits_and_restval(tmp_path, restval, expected):
    path, root = karpathy_file(tmp_path, ["train", "val", "test", "restval", "test"])
    out = tmp_path / "out"
    assert run_cli("retrieval", "--input", path, "--image-root", root, "--output", out, "--restval", restval) == 0
    m = manifest(out)
    assert set(m["splits"]) == set(expected)
    for split, imgids in expected.items():
        got = metas(out, split)
        assert [g["imgid"] for g in got] == imgids
        assert all(g["captions"] == [f"Image {g['imgid']} caption {j}." for j in range(5)] for g in got)
        assert all(g["image_id"] == 500 + g["imgid"] for g in got)
    test = samples(out, "test")
    assert close(pixel(test[1][1]["jpg"]), PALETTE[4]) and test[1][1]["txt"] == b"Image 4 caption 0."
    assert_verified(out)


# ---- nlvr2 ---------------------------------------------------------------------------------------
def test_nlvr2_pairs_left_and_right_images(tmp_path):
    root = tmp_path / "images" / "train"
    lines = []
    for i in range(3):
        directory = i % 2
        write_image(root / str(directory) / f"train-{10 + i}-{i}-img0.png", PALETTE[i], fmt="PNG")
        write_image(root / str(directory) / f"train-{10 + i}-{i}-img1.png", PALETTE[i + 3])  # JPEG named .png
        lines.append({"sentence": f"Sentence {i}.", "label": "True" if i != 1 else "False",
                      "identifier": f"train-{10 + i}-{i}-{i % 2}", "directory": directory,
                      "left_url": "http://l", "right_url": "http://r", "writer": "1", "synset": "n0",
                      "query": "q", "extra_validations": {}})
    path = tmp_path / "train.json"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "out"
    assert run_cli("nlvr2", "--input", path, "--image-root", root, "--output", out) == 0
    assert manifest(out)["fields"] == ["img0.jpg", "img1.jpg", "txt", "json"]
    got = samples(out)
    assert len(got) == 3
    for i, (key, fields) in enumerate(got):
        assert close(pixel(fields["img0.jpg"]), PALETTE[i]) and close(pixel(fields["img1.jpg"]), PALETTE[i + 3])
        meta = json.loads(fields["json"])
        assert meta["label"] is (i != 1) and meta["identifier"] == f"train-{10 + i}-{i}-{i % 2}"
        assert fields["txt"].decode() == f"Sentence {i}."
    assert_verified(out)


# ---- classify --------------------------------------------------------------------------------------
def test_classify_from_split_class_folders(tmp_path):
    root = tmp_path / "cls"
    for split, n in (("train", 2), ("val", 1)):
        for c, name in enumerate(["cat", "dog", "zebra"]):
            for i in range(n):
                write_image(root / split / name / f"{i}.jpg", PALETTE[c])
    out = tmp_path / "out"
    assert run_cli("classify", "--input", root, "--output", out) == 0
    assert json.loads((out / "classes.json").read_text()) == {"classes": ["cat", "dog", "zebra"]}
    assert manifest(out)["fields"] == ["jpg", "cls", "json"]
    got = samples(out, "train")
    assert [f["cls"] for _, f in got] == [b"0", b"0", b"1", b"1", b"2", b"2"]
    assert json.loads(got[2][1]["json"])["label_name"] == "dog"
    assert manifest(out)["splits"]["val"]["num_samples"] == 3
    assert_verified(out)


def test_classify_from_table(tmp_path, photo_dir):
    table = tmp_path / "labels.csv"
    table.write_text("image,label\nimg0.jpg,bird\nimg1.jpg,ant\nimg2.jpg,bird\nimg3.jpg,\n")
    out = tmp_path / "out"
    assert run_cli("classify", "--input", table, "--image-root", photo_dir, "--output", out) == 0
    assert json.loads((out / "classes.json").read_text()) == {"classes": ["ant", "bird"]}
    assert [json.loads(f["json"])["label"] for _, f in samples(out)] == [1, 0, 1]
    assert manifest(out)["skipped"] == {"missing_field": 1}
    assert_verified(out)


@pytest.mark.parametrize("command", ["pairs", "vqa", "retrieval", "nlvr2", "classify", "synth", "tokenizer",
                                     "verify"])
def test_every_command_has_help(command, capsys):
    from data_prep.cli import main

    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    assert f"data_prep {command}" in capsys.readouterr().out


def test_classify_table_labels():
    from data_prep.classify import table_labels

    assert table_labels([(1, {"label": 2}), (2, {"label": 0})], "label") == ["0", "1", "2"]
    assert table_labels([(1, {"label": "b"}), (2, {"label": "a "}), (3, {"label": None})], "label") == ["a", "b"]
