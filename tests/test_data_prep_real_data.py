"""What a new user hit on small real files: splits that overwrite each other, stale or damaged shards reused,
0 samples written with exit 0, empty answers.json, image-less classes, EXIF rotation, duplicate keys."""
from __future__ import annotations

import io
import json
import os
import tarfile

from PIL import Image

from data_prep.verify import verify
from tests.fixtures_data_prep import PALETTE, jpeg_bytes, manifest, metas, run_cli, samples, write_image


def vqa_files(root, name, ids, *, answers=None, missing=()):
    """VQAv2 questions + annotations for image/question ids `ids`; images under root/images."""
    questions, annotations = [], []
    for i in ids:
        if i not in missing:
            write_image(root / "images" / f"COCO_{name}2014_{i:012d}.jpg", PALETTE[i % 6])
        questions.append({"image_id": i, "question": f"what is {i}?", "question_id": 10 * i})
        answer = (answers or {}).get(i, "yes" if i % 2 else "no")
        annotations.append({"question_id": 10 * i, "image_id": i, "question_type": "what", "answer_type": "other",
                            "multiple_choice_answer": answer,
                            "answers": [{"answer": answer, "answer_id": j + 1} for j in range(10)]})
    qf, af = root / f"{name}_questions.json", root / f"{name}_annotations.json"
    qf.write_text(json.dumps({"data_subtype": f"{name}2014", "questions": questions}))
    af.write_text(json.dumps({"annotations": annotations}))
    return qf, af


def run_vqa(qf, af, root, out, split, *extra):
    return run_cli("vqa", "--questions", qf, "--annotations", af, "--image-root", root / "images", "--output", out,
                   "--split", split, "--min-answer-count", 1, "--image-size", 16, "--shard-size", 2, *extra)


# ---- issue 14 item 1: splits accumulate in one folder ----------------------------------------------
def test_val_written_after_train_keeps_train_and_its_answers(tmp_path, capsys):
    out = tmp_path / "vqa"
    train_q, train_a = vqa_files(tmp_path, "train", range(1, 6), missing=(5,))
    val_q, val_a = vqa_files(tmp_path, "val", range(11, 14), answers={11: "maybe", 12: "maybe", 13: "maybe"})
    assert run_vqa(train_q, train_a, tmp_path, out, "train") == 0
    answers = (out / "answers.json").read_bytes()
    assert json.loads(answers)["answers"] == ["yes", "no"]
    train_shards = manifest(out)["splits"]["train"]["shards"]
    assert run_vqa(val_q, val_a, tmp_path, out, "val") == 0
    m = manifest(out)
    assert sorted(m["splits"]) == ["train", "val"] and m["splits"]["train"]["shards"] == train_shards
    assert m["splits"]["train"]["skipped"] == {"missing_file": 1} and m["splits"]["val"]["skipped"] == {}
    assert m["skipped"] == {"missing_file": 1}  # the total over the folder
    sizes = json.loads((out / "sizes.json").read_text())
    assert set(sizes) == set(m["checksums"]) == set(train_shards) | set(m["splits"]["val"]["shards"])
    assert (out / "answers.json").read_bytes() == answers  # built from train only: val's "maybe" is not in it
    assert m["files"] == {"answers": "answers.json"}
    assert "kept splits train" in capsys.readouterr().out
    assert verify(str(out))[0] == []
    # a rerun of train replaces only train: its skip count and answers follow the new train file
    train_q, train_a = vqa_files(tmp_path, "train", range(1, 5), answers={i: "blue" for i in range(1, 5)})
    assert run_vqa(train_q, train_a, tmp_path, out, "train") == 0
    m = manifest(out)
    assert m["splits"]["train"]["skipped"] == {} and m["skipped"] == {}
    assert m["splits"]["val"]["num_samples"] == 3 and m["splits"]["train"]["num_samples"] == 4
    assert json.loads((out / "answers.json").read_text())["answers"] == ["blue"]
    assert verify(str(out))[0] == []


def test_val_alone_writes_no_answers_and_task_must_match(tmp_path, capsys):
    out = tmp_path / "vqa"
    val_q, val_a = vqa_files(tmp_path, "val", range(1, 4))
    assert run_vqa(val_q, val_a, tmp_path, out, "val") == 0
    assert not (out / "answers.json").exists() and manifest(out)["files"] == {}
    assert "no answers.json: it is built from the split named 'train' only" in capsys.readouterr().out
    table = tmp_path / "pairs.jsonl"
    write_image(tmp_path / "p.jpg")
    table.write_text(json.dumps({"image": "p.jpg", "caption": "a photo"}) + "\n")
    assert run_cli("pairs", "--input", table, "--output", out, "--split", "extra") == 2
    err = capsys.readouterr().err
    assert "holds task 'vqa'" in err and "task 'pairs'" in err
    assert sorted(manifest(out)["splits"]) == ["val"]  # refused before anything was touched


def class_tree(root, layout):
    """root/<split>/<class>/<n>.jpg for {split: {class: n_images}}; a class with 0 images gets a text file."""
    for split, classes in layout.items():
        for name, n in classes.items():
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                write_image(folder / f"{i}.jpg", PALETTE[i % 6])
            if n == 0:
                (folder / "README.txt").write_text("no images here")


def test_classify_imageless_class_gets_no_id_and_val_alone_keeps_classes(tmp_path, capsys):
    src, out = tmp_path / "src", tmp_path / "cls"
    class_tree(src, {"train": {"ant": 2, "bee": 0, "cat": 2}, "val": {"ant": 1, "cat": 1}})
    assert run_cli("classify", "--input", src, "--output", out, "--image-size", 16) == 0
    assert json.loads((out / "classes.json").read_text()) == {"classes": ["ant", "cat"]}
    assert "class folders without a usable image get no class id: bee" in capsys.readouterr().out
    assert sorted((m["label"], m["label_name"]) for m in metas(out, "train")) == [(0, "ant"), (0, "ant"),
                                                                                   (1, "cat"), (1, "cat")]
    classes = (out / "classes.json").read_bytes()
    # a later run of another split alone uses the folder's classes.json and keeps it
    only_val = tmp_path / "only_val"
    class_tree(only_val, {"x": {"cat": 1}})
    assert run_cli("classify", "--input", only_val / "x", "--output", out, "--split", "test",
                   "--image-size", 16) == 0
    assert (out / "classes.json").read_bytes() == classes
    assert [m["label"] for m in metas(out, "test")] == [1]
    assert sorted(manifest(out)["splits"]) == ["test", "train", "val"]


# ---- issue 14 items 4 and 16.9: reruns redo changed inputs and damaged shards -------------------------
def pairs_table(root, n):
    table = root / "pairs.jsonl"
    table.write_text("".join(json.dumps({"image": f"img/{i}.jpg", "caption": f"photo {i}"}) + "\n" for i in range(n)))
    return table


def run_pairs(table, out, *extra):
    return run_cli("pairs", "--input", table, "--output", out, "--image-size", 16, "--shard-size", 2, *extra)


def test_rerun_redoes_exactly_the_shards_whose_images_changed(tmp_path, capsys):
    table, out = pairs_table(tmp_path, 6), tmp_path / "out"
    for i in range(4):
        write_image(tmp_path / "img" / f"{i}.jpg", PALETTE[i])
    assert run_pairs(table, out) == 0  # images 4 and 5 are missing: shard 2 is empty
    assert manifest(out)["splits"]["train"]["num_samples"] == 4
    capsys.readouterr()
    for i in (4, 5):  # the user adds the missing images
        write_image(tmp_path / "img" / f"{i}.jpg", PALETTE[i])
    assert run_pairs(table, out) == 0
    summary = capsys.readouterr().out
    assert "2 finished shards reused, 1 shards redone: inputs changed" in summary
    assert manifest(out)["splits"]["train"]["num_samples"] == 6
    # a replaced image (same name) redoes only its shard
    write_image(tmp_path / "img" / "0.jpg", PALETTE[5], size=(50, 30))
    os.utime(tmp_path / "img" / "0.jpg", ns=(1, 1))
    assert run_pairs(table, out) == 0
    assert "2 finished shards reused, 1 shards redone: inputs changed" in capsys.readouterr().out
    assert verify(str(out))[0] == []


def test_damaged_finished_shard_is_redone(tmp_path, capsys):
    table, out = pairs_table(tmp_path, 4), tmp_path / "out"
    for i in range(4):
        write_image(tmp_path / "img" / f"{i}.jpg", PALETTE[i])
    assert run_pairs(table, out) == 0
    good = (out / "train-000001.tar").read_bytes()
    damaged = bytearray(good)
    damaged[700] ^= 0xFF  # same size, other bytes
    (out / "train-000001.tar").write_bytes(bytes(damaged))
    capsys.readouterr()
    assert run_pairs(table, out) == 0
    assert "1 finished shards reused, 1 shards redone: shard damaged (sha256 differs)" in capsys.readouterr().out
    assert (out / "train-000001.tar").read_bytes() == good
    (out / "train-000000.tar").write_bytes(good[:1024])  # truncated
    assert run_pairs(table, out) == 0
    assert "shard damaged (size differs)" in capsys.readouterr().out
    assert verify(str(out))[0] == []


# ---- issue 14 items 7 and 8: nothing written is an error ---------------------------------------------
def test_wrong_image_root_fails_with_reasons_and_example(tmp_path, capsys):
    qf, af = vqa_files(tmp_path, "train", range(1, 5))
    out = tmp_path / "out"
    assert run_cli("vqa", "--questions", qf, "--annotations", af, "--image-root", tmp_path / "nowhere",
                   "--output", out, "--min-answer-count", 1) == 2
    err = capsys.readouterr().err
    assert "wrote 0 of the 4 records read" in err and "missing_file: 4" in err
    assert str(tmp_path / "nowhere" / "COCO_train2014_000000000001.jpg") in err
    # partly written below --min-written
    write_image(tmp_path / "nowhere" / "COCO_train2014_000000000001.jpg")
    assert run_cli("vqa", "--questions", qf, "--annotations", af, "--image-root", tmp_path / "nowhere",
                   "--output", out, "--min-answer-count", 1, "--min-written", 0.5) == 2
    assert "wrote 1 of the 4 records read (--min-written 0.5 needs 2)" in capsys.readouterr().err
    assert run_cli("vqa", "--questions", qf, "--annotations", af, "--image-root", tmp_path / "nowhere",
                   "--output", out, "--min-answer-count", 1, "--min-written", 0.25) == 0
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert run_cli("pairs", "--input", empty, "--output", tmp_path / "empty_out") == 2
    assert "the input holds no records" in capsys.readouterr().err


def test_verify_fails_on_an_empty_split(tmp_path):
    table, out = pairs_table(tmp_path, 2), tmp_path / "out"
    for i in range(2):
        write_image(tmp_path / "img" / f"{i}.jpg", PALETTE[i])
    assert run_pairs(table, out) == 0
    m = manifest(out)
    m["splits"]["val"] = {"shards": [], "num_samples": 0}
    (out / "manifest.json").write_text(json.dumps(m))
    assert any("split val: no samples" in p for p in verify(str(out))[0])
    assert run_cli("verify", out) == 1


def test_empty_answer_vocabulary_is_an_error(tmp_path, capsys):
    qf, af = vqa_files(tmp_path, "train", range(1, 5))
    out = tmp_path / "out"
    args = ("vqa", "--questions", qf, "--image-root", tmp_path / "images", "--output", out)
    assert run_cli(*args, "--annotations", af, "--min-answer-count", 9) == 2
    err = capsys.readouterr().err
    assert "--min-answer-count 9" in err and ">=1: 2, >=2: 2, >=3: 0" in err
    assert not (out / "answers.json").exists()
    assert run_cli(*args) == 2  # train without annotations: no answers at all
    assert "has no answers (pass --annotations" in capsys.readouterr().err


# ---- issue 16 items 7 and 8: EXIF orientation, duplicate keys -----------------------------------------
def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (60, 30), PALETTE[0])
    exif = img.getexif()
    exif[0x0112] = 6  # stored landscape, shown rotated 90 degrees: a portrait photo
    (tmp_path / "img").mkdir()
    img.save(tmp_path / "img" / "0.jpg", format="JPEG", exif=exif)
    table, out = pairs_table(tmp_path, 1), tmp_path / "out"
    assert run_pairs(table, out, "--resize-mode", "none") == 0
    with Image.open(io.BytesIO(samples(out)[0][1]["jpg"])) as written:
        assert written.size == (30, 60)


def test_duplicate_key_in_input_tar_is_skipped_not_merged(tmp_path, capsys):
    src = tmp_path / "shards"
    src.mkdir()
    members = [("000000001.jpg", jpeg_bytes(PALETTE[0])), ("000000001.txt", b"first"),
               ("000000001.jpg", jpeg_bytes(PALETTE[1])), ("000000001.txt", b"second"),
               ("000000002.jpg", jpeg_bytes(PALETTE[2])), ("000000002.txt", b"third")]
    with tarfile.open(src / "00000.tar", "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    out = tmp_path / "out"
    assert run_cli("pairs", "--input", src, "--output", out, "--image-size", 16) == 0
    assert [m["caption"] for m in metas(out)] == ["first", "third"]
    assert manifest(out)["skipped"] == {"duplicate_key": 1}
    assert "duplicate_key: 1" in capsys.readouterr().out


def test_duplicate_json_keys_are_refused_with_file_and_line(tmp_path, capsys):
    qf = tmp_path / "q.json"
    qf.write_text('{"data_subtype": "train2014",\n "questions": [\n  {"image_id": 1, "question": "a?",\n'
                  '   "question": "b?", "question_id": 1}]}\n')
    assert run_cli("vqa", "--questions", qf, "--image-root", tmp_path, "--output", tmp_path / "o1") == 2
    assert f"{qf}:4: duplicate key 'question'" in capsys.readouterr().err
    table = tmp_path / "t.jsonl"
    table.write_text('{"image": "a.jpg", "caption": "x"}\n{"image": "a.jpg", "caption": "x", "caption": "y"}\n')
    assert run_cli("pairs", "--input", table, "--output", tmp_path / "o2") == 2
    assert f"{table}:2:" in capsys.readouterr().err
