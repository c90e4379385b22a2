"""Retrieval R@K with 5 captions per image, hand-worked, including ties."""
import math

import pytest
import torch

from pipeline.metrics.retrieval import chance_recall, i2t_ranks, retrieval_recall, t2i_ranks

N_IMG, CAPS = 3, 5
TEXT_IMAGE = torch.arange(N_IMG).repeat_interleave(CAPS)  # captions 0-4 -> image 0, ...


def test_perfect_scores_give_recall_one():
    sim = (TEXT_IMAGE.unsqueeze(0) == torch.arange(N_IMG).unsqueeze(1)).float()
    res = retrieval_recall(sim, TEXT_IMAGE)
    assert all(v == 1.0 for v in res.values())


def test_i2t_uses_best_ranked_of_the_five_captions():
    sim = torch.zeros(N_IMG, N_IMG * CAPS)
    # image 0: its caption 3 scores 0.9; 7 wrong captions score higher (0.95) -> rank 7
    sim[0, 3] = 0.9
    sim[0, 5:12] = 0.95
    # image 1: best own caption 0.5, wrong captions 0.4 or less -> rank 0
    sim[1, 5:10] = torch.tensor([0.1, 0.5, 0.2, 0.3, 0.1])
    sim[1, 0] = 0.4
    # image 2: own captions all -1, so every wrong caption (score 0) beats them -> rank 10
    sim[2, 10:15] = -1.0
    assert i2t_ranks(sim, TEXT_IMAGE).tolist() == [7, 0, 10]
    res = retrieval_recall(sim, TEXT_IMAGE)
    assert res["i2t_r1"] == pytest.approx(1 / 3)
    assert res["i2t_r5"] == pytest.approx(1 / 3)
    assert res["i2t_r10"] == pytest.approx(2 / 3)


def test_t2i_rank_of_each_caption():
    sim = torch.zeros(N_IMG, N_IMG * CAPS)
    sim[0, :CAPS] = 1.0  # captions of image 0 find it first
    sim[2, 5] = 1.0  # caption 5 (image 1) prefers image 2 -> rank 1
    sim[1, 5] = 0.5
    sim[1, 6:10] = 2.0  # other image-1 captions: rank 0
    sim[2, 10:15] = 0.3  # image-2 captions: 0.3 vs 0 -> rank 0
    ranks = t2i_ranks(sim, TEXT_IMAGE)
    assert ranks.tolist() == [0] * 5 + [1] + [0] * 4 + [0] * 5
    res = retrieval_recall(sim, TEXT_IMAGE)
    assert res["t2i_r1"] == pytest.approx(14 / 15)
    assert res["t2i_r5"] == 1.0


def test_ties_count_against_the_ground_truth():
    sim = torch.zeros(N_IMG, N_IMG * CAPS)  # a model that scores everything the same
    res = retrieval_recall(sim, TEXT_IMAGE, ks=(1, 2))
    # t2i: both wrong images tie with the true one -> rank 2, never in the top 2
    assert res["t2i_r1"] == 0.0 and res["t2i_r2"] == 0.0
    assert res["i2t_r1"] == 0.0
    assert t2i_ranks(sim, TEXT_IMAGE).tolist() == [2] * 15
    # a tie between two of an image's own captions does not hurt it
    sim2 = torch.zeros(N_IMG, N_IMG * CAPS)
    sim2[0, 0:2] = 1.0
    assert i2t_ranks(sim2, TEXT_IMAGE)[0] == 0


def test_mean_is_over_the_six_recalls():
    sim = torch.randn(N_IMG, N_IMG * CAPS, generator=torch.Generator().manual_seed(0))
    res = retrieval_recall(sim, TEXT_IMAGE)
    six = [res[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10)]
    assert res["r_mean"] == pytest.approx(sum(six) / 6)


def test_chance_level():
    ch = chance_recall(200, 5)
    assert ch["t2i_r5"] == pytest.approx(5 / 200)
    assert ch["i2t_r1"] == pytest.approx(5 / 1000)
    assert ch["i2t_r5"] == pytest.approx(1 - math.comb(995, 5) / math.comb(1000, 5))
    # random scores over many trials land near the chance level
    gen = torch.Generator().manual_seed(0)
    ti = torch.arange(20).repeat_interleave(5)
    r5 = sum(retrieval_recall(torch.rand(20, 100, generator=gen), ti)["t2i_r5"] for _ in range(200)) / 200
    assert r5 == pytest.approx(chance_recall(20)["t2i_r5"], abs=0.02)
