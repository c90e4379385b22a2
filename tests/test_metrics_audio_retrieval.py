"""Audio-text retrieval metrics (Clotho protocol): a2t/t2a R@K names and the DCASE 2022 task 6B mAP@10, hand-worked
and against a re-implementation of the official ``eval_script.py`` (xieh97/dcase2022-audio-retrieval)."""
import math

import numpy as np
import pytest
import torch

from pipeline.metrics.retrieval import (AUDIO_DIRECTIONS, average_precision_at_k, chance_map, chance_recall,
                                        mean_average_precision, retrieval_recall)

CAPS = 5


def text_clip(n: int, caps: int = CAPS) -> torch.Tensor:
    return torch.arange(n).repeat_interleave(caps)  # captions 0-4 -> clip 0, ...


def staircase(n: int, caps: int = CAPS) -> torch.Tensor:
    """sim [N, N*caps] where every caption of clip c ranks its clip at 1-based rank c + 1: clips c+1, ..., 2c
    (mod N) score above it, the others below."""
    sim = torch.zeros(n, n * caps)
    for t, c in enumerate(text_clip(n, caps).tolist()):
        for i in range(n):
            d = (i - c) % n
            position = c if d == 0 else (d - 1 if d <= c else d)
            sim[i, t] = float(n - position)
    return sim


def official_t2a(sim: np.ndarray, text_clip_t: np.ndarray) -> dict[str, float]:
    """eval_script.py's retrieval_metrics on the top-10 lists a system would submit (ranked by score)."""
    r1, r5, r10, map10 = [], [], [], []
    for t, gt in enumerate(text_clip_t):
        ranked = np.argsort(-sim[:, t], kind="stable")[:10]
        preds = np.asarray([gt == pred for pred in ranked])
        r1.append(np.sum(preds[:1], dtype=float))
        r5.append(np.sum(preds[:5], dtype=float))
        r10.append(np.sum(preds[:10], dtype=float))
        positions = np.arange(1, 11, dtype=float)[preds[:10] > 0]
        if len(positions) > 0:
            map10.append(np.sum(np.divide(np.arange(1, len(positions) + 1, dtype=float), positions), dtype=float))
        else:
            map10.append(0.0)
    return {"t2a_r1": np.mean(r1), "t2a_r5": np.mean(r5), "t2a_r10": np.mean(r10), "t2a_map10": np.mean(map10)}


def test_perfect_scores_give_one_everywhere():
    tc = text_clip(4)
    sim = (tc.unsqueeze(0) == torch.arange(4).unsqueeze(1)).float()
    res = retrieval_recall(sim, tc, directions=AUDIO_DIRECTIONS)
    assert set(res) == {f"{d}_r{k}" for d in ("a2t", "t2a") for k in (1, 5, 10)} | {"r_mean"}
    assert all(v == 1.0 for v in res.values())
    assert mean_average_precision(sim, tc) == 1.0


def test_known_ranks_give_known_recall_and_map():
    n = 12
    sim, tc = staircase(n), text_clip(n)
    ap = average_precision_at_k(sim, tc)  # clip c's captions: rank c + 1
    expected = torch.tensor([1 / (c + 1) if c < 10 else 0.0 for c in range(n)]).repeat_interleave(CAPS)
    assert torch.allclose(ap, expected)
    res = retrieval_recall(sim, tc, directions=AUDIO_DIRECTIONS)
    assert res["t2a_r1"] == pytest.approx(1 / 12)
    assert res["t2a_r5"] == pytest.approx(5 / 12)
    assert res["t2a_r10"] == pytest.approx(10 / 12)
    harmonic_10 = sum(1 / r for r in range(1, 11))
    assert mean_average_precision(sim, tc) == pytest.approx(harmonic_10 / 12)
    assert mean_average_precision(sim, tc, k=1) == pytest.approx(1 / 12)


def test_a2t_counts_the_best_ranked_of_a_clips_captions():
    tc = text_clip(3, caps=2)  # captions 0,1 -> clip 0; 2,3 -> clip 1; 4,5 -> clip 2
    sim = torch.zeros(3, 6)
    sim[0] = torch.tensor([0.5, 0.2, 0.9, 0.8, 0.1, 0.0])  # clip 0: best own caption 0.5, 2 wrong above -> rank 3
    sim[1] = torch.tensor([0.0, 0.0, 0.1, 0.7, 0.0, 0.0])  # clip 1: rank 1
    sim[2] = torch.tensor([0.3, 0.0, 0.0, 0.0, 0.3, 0.2])  # clip 2: a tie with a wrong caption -> rank 2
    res = retrieval_recall(sim, tc, ks=(1, 2, 3), directions=AUDIO_DIRECTIONS)
    assert (res["a2t_r1"], res["a2t_r2"], res["a2t_r3"]) == pytest.approx((1 / 3, 2 / 3, 1.0))


def test_ties_rank_against_the_ground_truth():
    """Every clip scores the same: the true clip ranks last, as for R@K (a constant model gets 0 at N > 10)."""
    assert mean_average_precision(torch.zeros(12, 60), text_clip(12)) == 0.0
    assert mean_average_precision(torch.zeros(4, 20), text_clip(4)) == pytest.approx(1 / 4)  # rank 4 of 4
    sim = torch.zeros(4, 20)
    sim[:2, 0] = 1.0  # caption 0 ties its clip with clip 1 at the top: rank 2
    assert average_precision_at_k(sim, text_clip(4))[0] == pytest.approx(0.5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_the_official_dcase_formula_on_random_scores(seed):
    rng = np.random.default_rng(seed)
    n = 37
    sim = rng.standard_normal((n, n * CAPS)) + 3.0 * np.eye(n).repeat(CAPS, axis=1) * rng.random((1, n * CAPS))
    tc = text_clip(n)
    official = official_t2a(sim, tc.numpy())
    ours = retrieval_recall(torch.from_numpy(sim), tc, directions=AUDIO_DIRECTIONS)
    ours["t2a_map10"] = mean_average_precision(torch.from_numpy(sim), tc)
    assert 0.05 < official["t2a_map10"] < 0.95  # neither trivial nor perfect
    for key, value in official.items():
        assert ours[key] == pytest.approx(value, abs=1e-6), key  # float32 means


def test_chance_levels():
    assert chance_map(1000) == pytest.approx(sum(1 / r for r in range(1, 11)) / 1000)
    assert chance_map(4) == pytest.approx((1 + 1 / 2 + 1 / 3 + 1 / 4) / 4)
    ch = chance_recall(40, 5, directions=AUDIO_DIRECTIONS)
    assert ch["t2a_r5"] == pytest.approx(5 / 40)
    assert ch["a2t_r1"] == pytest.approx(1 - math.comb(195, 1) / math.comb(200, 1))
    gen = torch.Generator().manual_seed(0)
    tc = text_clip(20)
    trials = [mean_average_precision(torch.rand(20, 100, generator=gen), tc) for _ in range(200)]
    assert sum(trials) / len(trials) == pytest.approx(chance_map(20), abs=0.01)
