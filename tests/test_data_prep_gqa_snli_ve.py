"""`data_prep gqa` and `data_prep snli_ve` on official-format files: samples, answers/classes, verify,
tokenizer text, deterministic reruns."""
from __future__ import annotations

import json

import pytest

from data_prep.tokenizer import corpus_texts
from data_prep.verify import verify
from tests.fixtures_data_prep import PALETTE, manifest, metas, run_cli, samples, tar_digests, write_image

GQA_ANSWERS = ["no", "yes", "left", "yes", "blue"]


def gqa_questions(tmp_path, name, with_answers=True, n=5):
    """{name}_balanced_questions.json (dict keyed by question id) + images/{imageId}.jpg."""
    doc = {}
    for i in range(n):
        image_id = f"n{1000 + i}" if i % 2 else str(2300000 + i)
        write_image(tmp_path / "images" / f"{image_id}.jpg", PALETTE[i % 6])
        q = {"imageId": image_id, "question": f"Is the thing {i} on the left?", "isBalanced": True,
             "groups": {"global": None, "local": "10c-rel"}, "entailed": [], "equivalent": [str(i)],
             "annotations": {"question": {}, "answer": {}, "fullAnswer": {}}, "semantic": []}
        if with_answers:
            q.update(answer=f" {GQA_ANSWERS[i]} ", fullAnswer=f"Yes, the thing {i} is.",
                     types={"detailed": "existRel", "semantic": "rel", "structural": "verify"})
        doc[f"{name}{i:05d}"] = q
    path = tmp_path / f"{name}_balanced_questions.json"
    path.write_text(json.dumps(doc))
    return path


def run_gqa(path, tmp_path, out, split, *extra):
    return run_cli("gqa", "--questions", path, "--image-root", tmp_path / "images", "--output", out,
                   "--split", split, "--image-size", 16, "--shard-size", 2, *extra)


def test_gqa_samples_answers_and_test_split(tmp_path, capsys):
    out = tmp_path / "gqa"
    assert run_gqa(gqa_questions(tmp_path, "train"), tmp_path, out, "train") == 0
    got = metas(out, "train")
    assert got[1] == {"key": "000000001", "question": "Is the thing 1 on the left?", "question_id": "train00001",
                      "image_id": "n1001", "answer": "yes", "full_answer": "Yes, the thing 1 is.",
                      "question_type": "verify", "semantic_type": "rel"}
    assert samples(out, "train")[0][1]["txt"] == b"Is the thing 0 on the left?"
    assert json.loads((out / "answers.json").read_text()) == {"answers": ["yes", "blue", "left", "no"],
                                                              "counts": [2, 1, 1, 1]}
    assert manifest(out)["task"] == "gqa" and manifest(out)["fields"] == ["jpg", "txt", "json"]
    answers = (out / "answers.json").read_bytes()
    test_file = gqa_questions(tmp_path, "testdev", with_answers=False, n=3)
    assert run_gqa(test_file, tmp_path, out, "testdev") == 0
    test = metas(out, "testdev")
    assert "answer" not in test[0] and test[0]["question_type"] == "unknown" and test[0]["full_answer"] == ""
    assert "semantic_type" not in test[0]
    assert (out / "answers.json").read_bytes() == answers and sorted(manifest(out)["splits"]) == ["testdev", "train"]
    assert verify(str(out))[0] == []
    texts = set(corpus_texts([str(out)]))
    assert {"Is the thing 0 on the left?", "left", "Yes, the thing 1 is."} <= texts
    capsys.readouterr()
    assert run_gqa(gqa_questions(tmp_path, "train"), tmp_path, out, "train", "--min-answer-count", 3) == 2
    assert "--min-answer-count 3" in capsys.readouterr().err


def test_gqa_rejects_a_list_and_reruns_identically(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"imageId": "1", "question": "q?"}]))
    assert run_gqa(bad, tmp_path, tmp_path / "bad_out", "train") == 2
    assert "expected a JSON object keyed by question id" in capsys.readouterr().err
    path, one, two = gqa_questions(tmp_path, "val"), tmp_path / "one", tmp_path / "two"
    assert run_gqa(path, tmp_path, one, "val") == 0 and run_gqa(path, tmp_path, two, "val", "--workers", 2) == 0
    assert tar_digests(one) == tar_digests(two) and len(tar_digests(one)) == 3
    capsys.readouterr()
    assert run_gqa(path, tmp_path, one, "val") == 0
    assert "3 finished shards reused" in capsys.readouterr().out


def snli_ve_file(tmp_path, name="snli_ve_dev.jsonl"):
    labels = ["entailment", "neutral", "contradiction", "-", "entailment"]
    lines = []
    for i, label in enumerate(labels):
        image = f"{3416050480 + i}.jpg" if i != 4 else "3416050484"  # the last one without an extension
        if i < 4:
            write_image(tmp_path / "flickr30k-images" / image, PALETTE[i])
        else:
            write_image(tmp_path / "flickr30k-images" / f"{image}.jpg", PALETTE[i])
        lines.append({"Flikr30kID": image, "sentence1": f"A dog runs {i}.", "sentence2": f"An animal moves {i}.",
                      "gold_label": label, "pairID": f"{3416050480 + i}.jpg#2r1{label[0]}",
                      "captionID": f"{3416050480 + i}.jpg#2", "annotator_labels": [label]})
    del lines[1]["sentence1"]
    path = tmp_path / name
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_snli_ve_samples_labels_and_classes(tmp_path, capsys):
    out = tmp_path / "snli_ve"
    assert run_cli("snli_ve", "--input", snli_ve_file(tmp_path), "--image-root", tmp_path / "flickr30k-images",
                   "--output", out, "--split", "dev", "--image-size", 16) == 0
    got = metas(out, "dev")
    assert got[0] == {"key": "000000000", "pair_id": "3416050480.jpg#2r1e", "image_id": "3416050480",
                      "hypothesis": "An animal moves 0.", "premise": "A dog runs 0.", "label": 0,
                      "label_name": "entailment"}
    assert [(g["label"], g["label_name"]) for g in got] == [(0, "entailment"), (1, "neutral"),
                                                            (2, "contradiction"), (0, "entailment")]
    assert got[1]["premise"] == "" and got[3]["image_id"] == "3416050484"
    assert samples(out, "dev")[2][1]["txt"] == b"An animal moves 2."
    m = manifest(out)
    assert m["task"] == "snli_ve" and m["skipped"] == {"bad_label": 1} and m["files"] == {"classes": "classes.json"}
    assert json.loads((out / "classes.json").read_text()) == {"classes": ["entailment", "neutral", "contradiction"]}
    assert verify(str(out))[0] == []
    assert {"An animal moves 1.", "A dog runs 2."} <= set(corpus_texts([str(out)]))


@pytest.mark.parametrize("command", ["gqa", "snli_ve"])
def test_new_commands_have_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        run_cli(command, "--help")
    assert exc.value.code == 0 and "--image-root" in capsys.readouterr().out
