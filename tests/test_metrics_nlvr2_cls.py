"""NLVR2 accuracy/consistency and top-k classification accuracy, hand-worked."""
import pytest
import torch

from pipeline.metrics.classification import class_accuracy, topk_accuracy
from pipeline.metrics.nlvr2 import nlvr2_metrics, sentence_key


def test_sentence_key_drops_the_pair_id():
    assert sentence_key("dev-850-0-1") == "dev-850-1"
    assert sentence_key("dev-850-3-1") == "dev-850-1"
    with pytest.raises(ValueError):
        sentence_key("dev-850")


def test_a_sentence_wrong_on_one_of_its_pairs_is_inconsistent():
    ids = ["dev-1-0-0", "dev-1-1-0", "dev-1-2-0", "dev-1-3-0",  # sentence dev-1-0 on 4 pairs
           "dev-2-0-1", "dev-2-1-1",  # sentence dev-2-1 on 2 pairs
           "dev-1-0-1"]  # another sentence of set 1
    labels = [True, False, True, False, True, True, False]
    preds = [True, False, True, True, True, True, False]  # sentence dev-1-0 wrong on pair 3 only
    res = nlvr2_metrics(preds, labels, ids)
    assert res["acc"] == pytest.approx(6 / 7)
    assert res["consistency"] == pytest.approx(2 / 3)


def test_topk_accuracy():
    logits = torch.tensor([
        [0.9, 0.1, 0.0, 0.0, 0.0, 0.0],  # label 0: top1
        [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],  # label 1: 4 classes above -> rank 4: top5 only
        [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],  # label 0: rank 5 -> neither
        [0.5, 0.5, 0.0, 0.0, 0.0, 0.0],  # label 1: tie with class 0 -> counts against -> rank 1
    ])
    labels = torch.tensor([0, 1, 0, 1])
    res = topk_accuracy(logits, labels)
    assert res["top1"] == pytest.approx(1 / 4)
    assert res["top5"] == pytest.approx(3 / 4)
    # K larger than the number of classes counts every sample
    assert topk_accuracy(logits, labels, ks=(10,))["top10"] == 1.0


def test_labels_outside_the_classes_count_as_wrong_and_are_never_indexed():
    logits = torch.tensor([[0.9, 0.1, 0.0], [0.9, 0.1, 0.0], [0.9, 0.1, 0.0]])
    res = topk_accuracy(logits, torch.tensor([0, -1, 7]), ks=(1, 5))
    assert res == {"top1": pytest.approx(1 / 3), "top5": pytest.approx(1 / 3)}


def test_class_accuracy_per_class_name():
    res = class_accuracy([0, 1, 1, 2, 0], [0, 1, 2, 2, -1], ["entailment", "neutral", "contradiction"])
    assert res["acc"] == pytest.approx(3 / 5) and res["num_scored"] == 5
    assert res["acc/entailment"] == 1.0 and res["acc/contradiction"] == 0.5 and res["acc/neutral"] == 1.0
    assert len(res) == 5  # the unknown label has no per-class key
