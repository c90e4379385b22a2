"""COCO caption metrics against the official pycocoevalcap 1.2 (salaniz/pycocoevalcap, pip) run once with
Java 17 on this fixed set: PTBTokenizer (CoreNLP 3.4.1) + Bleu(4), Rouge, Cider; the pinned numbers below are
its output (script: ``bench/caption_metrics_vs_official.py`` does the same on ~6,000 captions)."""
import pytest

from pipeline.metrics.captioning import (bleu, caption_metrics, cider_d_per_image, meteor_available, rouge_l)
from pipeline.metrics.ptb_tokenizer import ptb_tokenize, ptb_tokenize_lines

REFS = {
    "img1": ["A man riding a wave on top of a surfboard.", "A surfer rides a large wave in the ocean.",
             "A person on a surfboard riding a wave.", "Man surfing a big wave on his board.",
             "A surfer is riding the crest of a wave."],
    "img2": ["Two dogs playing with a frisbee in the park.", "A couple of dogs running on the grass.",
             "Two brown dogs chase a red frisbee.", "Dogs are playing in a grassy field.",
             "A pair of dogs fight over a toy."],
    "img3": ["A kitchen with a stove, a sink and a refrigerator.", "The kitchen has white cabinets.",
             "An empty kitchen with wooden floors.", "A clean kitchen in a small apartment.",
             "A stove top oven sitting inside of a kitchen."],
    "img4": ["A red double-decker bus on a city street.", "A bus driving down the road in the U.S. city.",
             "The red bus isn't moving; it's parked.", "A large red bus parked next to a sidewalk.",
             "A double decker bus stopped at a bus stop."],
    "img5": ["A plate of food with broccoli and rice.", "A white plate topped with chicken, rice and broccoli.",
             "Food (chicken and vegetables) on a plate.", "A healthy meal sits on the table.",
             "Broccoli, rice, and meat on a dinner plate."],
    "img6": ["A cat sleeping on a laptop keyboard.", "The cat's lying on the computer.",
             "A grey cat lays on top of an open laptop.", "A kitten napping on a keyboard.",
             "Cat resting on a black laptop computer."],
    "img7": ["A giraffe standing next to a tree.", "A tall giraffe eating leaves from a tree.",
             "One giraffe in a zoo enclosure.", "A giraffe near some trees on a sunny day.",
             "The giraffe is looking at the camera."],
}
PREDS = {
    "img1": "A man riding a wave on top of a surfboard.",   # exact match of a reference
    "img2": "two dogs are playing in the grass",            # partial, lower case, no period
    "img3": "a a a",                                        # degenerate
    "img4": "A RED BUS PARKED ON THE STREET!!",             # upper case; "!!" stays a token
    "img5": "Food -- chicken, rice & broccoli... on a plate?",  # punctuation
    "img6": "cat",                                          # one word
    "img7": "An elephant walking in the U.S.",              # wrong object, acronym
}
# official output (pycocoevalcap 1.2, Java 17), see the module docstring
OFFICIAL_RES_TOKENS = ["a man riding a wave on top of a surfboard", "two dogs are playing in the grass", "a a a",
                       "a red bus parked on the street !!", "food chicken rice & broccoli on a plate", "cat",
                       "an elephant walking in the u.s."]
OFFICIAL = {"bleu1": 0.7311966058300721, "bleu2": 0.6020408073866154, "bleu3": 0.49758916634385436,
            "bleu4": 0.4322132713797846, "rouge_l": 0.5195832823759147, "cider_d": 1.2334351494482607}
OFFICIAL_CIDER_PER_IMAGE = [3.331976464219072, 1.8865669708942046, 0.0, 1.3776646839066744, 1.5144526736199082,
                            0.5193726978090343, 0.004012555688932519]
OFFICIAL_METEOR = 0.26584102969667256


def test_metrics_match_official_scorers():
    result = caption_metrics(PREDS, REFS)
    for key, value in OFFICIAL.items():
        assert result[key] == pytest.approx(value, rel=1e-12, abs=1e-15), key
    if meteor_available():
        assert result["meteor"] == pytest.approx(OFFICIAL_METEOR, abs=1e-6)
    else:
        assert "meteor" not in result


def test_scorers_on_tokens_and_cider_per_image():
    cands = ptb_tokenize_lines([PREDS[i] for i in REFS])
    assert cands == OFFICIAL_RES_TOKENS
    flat = iter(ptb_tokenize_lines([r for i in REFS for r in REFS[i]]))
    refs = [[next(flat) for _ in REFS[i]] for i in REFS]
    assert cider_d_per_image(cands, refs) == pytest.approx(OFFICIAL_CIDER_PER_IMAGE, rel=1e-12, abs=1e-15)
    assert bleu(cands, refs)[3] == pytest.approx(OFFICIAL["bleu4"], rel=1e-12)
    assert rouge_l(cands, refs) == pytest.approx(OFFICIAL["rouge_l"], rel=1e-12)


def test_perfect_candidate_and_cider_document_frequency():
    refs = {1: ["a red circle", "a red circle on the left"], 2: ["a blue square", "the blue square"]}
    perfect = caption_metrics({1: "a red circle", 2: "a blue square"}, refs)
    assert perfect["bleu1"] == pytest.approx(1.0) and perfect["rouge_l"] == pytest.approx(1.0)
    # n-grams found in every image's references get idf log(2/2) = 0: "a" alone scores nothing
    assert caption_metrics({1: "a", 2: "a"}, refs)["cider_d"] == 0.0


TOKENIZER_CASES = [  # real PTBTokenizer output (CoreNLP 3.4.1 via pycocoevalcap), all in one tokenize() call
    ("A man's dog, running (fast) in the U.S. park.", "a man 's dog running -lrb- fast -rrb- in the u.s. park"),
    ("It isn't grey; it's \"bright\" -- really...", "it is n't grey it 's bright really"),
    ("1,000 people paid $3.50 at 10:30 a.m.", "1,000 people paid $ 3.50 at 10:30 a.m."),
    ("A black-and-white cat? Yes! e.g. Mr. Smith", "a black-and-white cat yes e.g. mr. smith"),
    ("They can't, won't; I'm gonna go.", "they ca n't wo n't i 'm gon na go"),
    ("mother-in-law's 3-year-old x-ray", "mother-in-law 's 3-year-old x-ray"),
    ("AT&T at&t 50% off #1 fan", "at&t at & t 50 % off # 1 fan"),
    ("Teddy bears.A cat [on] {a} <mat> :)", "teddy bears.a cat -lsb- on -rsb- -lcb- a -rcb- <mat> :-rrb-"),
    ("o'clock rock'n'roll y'all the '90s", "o'clock rock 'n' roll y' all the '90s"),
    ("The U.S. The end", "the u.s. the end"),
    ("dog.,", "dog."),
    ("A.", "a."),
]


def test_tokenizer_matches_java_ptb_tokenizer():
    assert ptb_tokenize_lines([raw for raw, _ in TOKENIZER_CASES]) == [tok for _, tok in TOKENIZER_CASES]
    # alone, a caption is the file's last line: the smiley has no character after it to close the rule
    assert ptb_tokenize("a cat :)") == "a cat -rrb-"


def test_tokenizer_looks_at_the_next_line_like_the_java_lexer():
    # a one-letter acronym before "The" on the next line loses its period; before "Two" it keeps it
    assert ptb_tokenize_lines(["A.", "The end", "A.", "Two dogs"]) == ["a", "the end", "a.", "two dogs"]


def test_ids_must_match():
    with pytest.raises(ValueError, match=r"prediction but no references.*'x'"):
        caption_metrics({"x": "a cat", 1: "a dog"}, {1: ["a dog"]})
    with pytest.raises(ValueError, match=r"references but no prediction.*2"):
        caption_metrics({1: "a dog"}, {1: ["a dog"], 2: ["a cat"]})
    with pytest.raises(ValueError, match="empty reference list"):
        caption_metrics({1: "a dog"}, {1: []})
