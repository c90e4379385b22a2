"""synth: answers balanced per question text, answers true and unique, captions complete, determinism."""
from __future__ import annotations

import random
import re
from collections import Counter, defaultdict

import pytest

from data_prep.synth_text import AnswerCycle, answer_vocabulary, make_captions, make_qa
from data_prep.synth_world import COLORS, QUADRANTS, SHAPES, random_scene
from data_prep.verify import verify
from tests.fixtures_data_prep import manifest, metas, run_cli, samples, tar_digests

ANSWERS_BY_TYPE = {"color": set(COLORS), "shape": set(SHAPES), "count": {"0", "1", "2", "3"},
                   "position": set(QUADRANTS), "exists": {"yes", "no"}}


def oracle(question: str, objects: list[dict]) -> str:
    """Independent answer from the scene description; asserts the question has a unique referent."""
    def only(matches):
        assert len(matches) == 1, (question, objects)
        return matches[0]
    singular = {s: s for s in SHAPES} | {s + "s": s for s in SHAPES} | {s + "es": s for s in SHAPES}
    if m := re.fullmatch(r"what (?:color is|is the color of) the (\w+)\?", question):
        return only([o for o in objects if o["shape"] == m[1]])["color"]
    if m := re.fullmatch(r"what color is the object in the (.+)\?", question):
        return only([o for o in objects if o["quadrant"] == m[1]])["color"]
    if m := re.fullmatch(r"(?:what shape is the (\w+) object|which shape is (\w+))\?", question):
        color = m[1] or m[2]
        return only([o for o in objects if o["color"] == color])["shape"]
    if m := re.fullmatch(r"what shape is in the (.+)\?", question):
        return only([o for o in objects if o["quadrant"] == m[1]])["shape"]
    if question == "how many objects are there?":
        return str(len(objects))
    if m := re.fullmatch(r"how many (\w+) objects are there\?", question):
        return str(sum(o["color"] == m[1] for o in objects))
    if m := re.fullmatch(r"how many (\w+) are there\?", question):
        return str(sum(o["shape"] == singular[m[1]] for o in objects))
    if m := re.fullmatch(r"where is the (\w+) (\w+)\?", question):
        return only([o for o in objects if o["color"] == m[1] and o["shape"] == m[2]])["quadrant"]
    if m := re.fullmatch(r"where is the (\w+)\?", question):
        return only([o for o in objects if o["shape"] == m[1]])["quadrant"]
    if m := re.fullmatch(r"is there a (\w+) (\w+)\?", question):
        return "yes" if any(o["color"] == m[1] and o["shape"] == m[2] for o in objects) else "no"
    raise AssertionError(f"unknown question {question!r}")


def generate(seed: int, n: int):
    rng = random.Random(seed)
    cycle = AnswerCycle(rng)
    return [make_qa(rng, cycle, 64) for _ in range(n)]


def test_answers_are_true_unique_and_typed():
    for qa in generate(1, 1500):
        objects = qa.scene.describe()
        assert 1 <= len(objects) <= 3 and len({o["quadrant"] for o in objects}) == len(objects)
        assert oracle(qa.question, objects) == qa.answer
        assert qa.answer in ANSWERS_BY_TYPE[qa.question_type]


def test_question_only_baseline_is_at_chance():
    """A per-question-text majority answer, fitted on one sample and scored on another, is at chance."""
    train, test = generate(2, 4000), generate(3, 2000)
    by_text = defaultdict(Counter)
    for qa in train:
        by_text[qa.question][qa.answer] += 1
    majority = {q: c.most_common(1)[0][0] for q, c in by_text.items()}
    per_type_hits, per_type_n, chance = Counter(), Counter(), Counter()
    for qa in test:
        per_type_n[qa.question_type] += 1
        per_type_hits[qa.question_type] += majority.get(qa.question) == qa.answer
        n_answers = 4 if qa.question_type == "count" and "objects are there" in qa.question else None
        n_answers = 3 if qa.question == "how many objects are there?" else n_answers
        chance[qa.question_type] += 1 / (n_answers or len(ANSWERS_BY_TYPE[qa.question_type]))
    for qtype in ANSWERS_BY_TYPE:
        acc, expected = per_type_hits[qtype] / per_type_n[qtype], chance[qtype] / per_type_n[qtype]
        assert acc < expected + 0.08, (qtype, acc, expected)
    # Within one text, counts are balanced to within one round of the answer cycle.
    for question, counts in by_text.items():
        assert max(counts.values()) - min(counts.values()) <= 1 or len(counts) < 2, (question, counts)


def test_question_types_cover_all_and_vocab_is_complete():
    qas = generate(4, 1000)
    assert {qa.question_type for qa in qas} == set(ANSWERS_BY_TYPE)
    assert set(answer_vocabulary()) == set().union(*ANSWERS_BY_TYPE.values())
    assert len(answer_vocabulary()) == 20


def test_captions_name_every_object_and_differ():
    rng = random.Random(5)
    for _ in range(200):
        scene = random_scene(rng, 64)
        captions = make_captions(rng, scene, 5)
        assert len(set(captions)) == 5
        for caption in captions:
            # fits text_len 32 with [CLS]/[SEP] when every word is one token (BERT pre-tokenisation)
            assert len(re.findall(r"\w+|[^\w\s]", caption)) <= 30, caption
            for o in scene.describe():
                assert all(o[k] in caption for k in ("shape", "color", "size", "quadrant")), (caption, o)


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "data"
    assert run_cli("synth", "--output", out, "--num-samples", 120, "--num-val", 40, "--seed", 7,
                   "--shard-size", 50) == 0
    return out


def test_synth_layout_and_verify(synth_dir):
    for part, task, splits in [("captions", "pairs", {"train", "val"}), ("vqa", "vqa", {"train", "val"}),
                               ("retrieval", "retrieval", {"train", "test"})]:
        m = manifest(synth_dir / part)
        assert m["task"] == task and set(m["splits"]) == splits and m["fields"] == ["jpg", "txt", "json"]
        assert verify(str(synth_dir / part))[0] == []
    m = manifest(synth_dir / "vqa")
    assert m["splits"]["train"]["num_samples"] == 120 and len(m["splits"]["train"]["shards"]) == 3
    assert m["files"] == {"answers": "answers.json"}
    vqa = metas(synth_dir / "vqa", "train")
    assert all(len(v["answers"]) == 10 and v["targets"] == {v["answers"][0]: 1.0} for v in vqa)
    assert {v["answer_type"] for v in vqa} == {"yes/no", "number", "other"}
    test = metas(synth_dir / "retrieval", "test")
    assert len(test) == 200 and all(len(t["captions"]) == 5 for t in test)
    assert len({tuple(sorted(map(str, t["scene"]))) for t in test}) == 200  # distinct scenes
    key, fields = samples(synth_dir / "captions", "val")[0]
    assert fields["txt"].decode() and len(fields["jpg"]) > 500


def test_synth_is_deterministic_and_worker_independent(synth_dir, tmp_path):
    again = tmp_path / "again"
    assert run_cli("synth", "--output", again, "--num-samples", 120, "--num-val", 40, "--seed", 7,
                   "--shard-size", 50, "--workers", 2) == 0
    for part in ("captions", "vqa", "retrieval"):
        assert tar_digests(again / part) == tar_digests(synth_dir / part)
        assert (again / part / "answers.json").exists() == (part == "vqa")
    other = tmp_path / "other"
    assert run_cli("synth", "--output", other, "--num-samples", 20, "--num-val", 5, "--num-retrieval-test", 5,
                   "--seed", 8) == 0
    assert metas(other / "vqa", "train")[0] != metas(synth_dir / "vqa", "train")[0]


def test_tokenizer_loads_and_round_trips(synth_dir, tmp_path):
    from transformers import AutoTokenizer

    tok_dir = tmp_path / "tok"
    assert run_cli("tokenizer", "--shards", synth_dir / "captions", synth_dir / "vqa", "--vocab-size", 150,
                   "--output", tok_dir) == 0
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    assert type(tok).__name__ in ("BertTokenizerFast", "BertTokenizer") and tok.is_fast
    assert [tok.pad_token_id, tok.unk_token_id, tok.cls_token_id, tok.sep_token_id, tok.mask_token_id] == \
        [0, 1, 2, 3, 4]
    text = "What color is the large Circle in the top left?"
    enc = tok(text, padding="max_length", max_length=24, truncation=True)
    assert enc["input_ids"][0] == 2 and 3 in enc["input_ids"] and enc["input_ids"][-1] == 0
    assert tok.decode(enc["input_ids"], skip_special_tokens=True) == text.lower()
    assert tok.unk_token_id not in enc["input_ids"]
