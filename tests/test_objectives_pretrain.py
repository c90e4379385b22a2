"""Pretraining objectives on one process: MLM masking rules, ITC/ITM/MLM losses, full step backward."""
import torch
from torch import nn

from pipeline.model import ModelConfig, MoEConfig, VLMoE
from pipeline.model.heads import ITCHead, ITMHead, MLMHead
from pipeline.objectives.pretrain import (IGNORE, itc_loss, mask_tokens, mlm_loss, sample_hard_negatives,
                                          vl_pretrain_losses)

SPECIALS = [0, 1, 2, 3, 4]  # [PAD] [UNK] [CLS] [SEP] [MASK]


def test_mask_tokens_bert_rules():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 1000, (64, 128), generator=g)
    ids[:, 0], ids[:, 100] = 2, 3
    mask = torch.ones_like(ids)
    mask[:, 101:] = 0
    ids[:, 101:] = 0
    masked, labels = mask_tokens(ids, mask, SPECIALS, mask_id=4, vocab_size=1000, generator=g)
    chosen = labels != IGNORE
    assert not chosen[:, 0].any() and not chosen[:, 100:].any()  # never specials or padding
    rate = chosen.float().sum() / 99 / 64
    assert 0.13 < rate < 0.17
    assert torch.equal(labels[chosen], ids[chosen])
    as_mask = (masked[chosen] == 4).float().mean()
    kept = (masked[chosen] == ids[chosen]).float().mean()
    assert 0.75 < as_mask < 0.85 and 0.06 < kept < 0.14
    assert torch.equal(masked[~chosen], ids[~chosen])
    assert not torch.isin(masked[chosen & (masked != 4) & (masked != ids)], torch.tensor(SPECIALS)).any()


def test_itc_loss_prefers_matching_pairs():
    feats = nn.functional.normalize(torch.randn(6, 16), dim=-1)
    good = itc_loss(feats, feats, torch.tensor(20.0))
    bad = itc_loss(feats, feats.roll(1, 0), torch.tensor(20.0))
    assert good.loss < bad.loss and good.accuracy == 1.0 and good.sim_i2t.shape == (6, 6)


def test_hard_negatives_never_positive():
    sim = torch.randn(5, 5) * 10
    for _ in range(20):
        neg_t, neg_i = sample_hard_negatives(sim, sim.t())
        assert (neg_t != torch.arange(5)).all() and (neg_i != torch.arange(5)).all()
    sim = torch.zeros(4, 4)
    sim[0, 2] = 50  # a very hard negative is sampled almost surely
    assert int(sample_hard_negatives(sim, sim)[0][0]) == 2


def test_mlm_loss_empty_is_zero_with_graph():
    head = MLMHead(nn.Embedding(20, 8))
    hidden = torch.randn(2, 4, 8, requires_grad=True)
    loss, _ = mlm_loss(head, hidden, torch.full((2, 4), IGNORE))
    loss.backward()
    assert float(loss.detach()) == 0.0


def test_full_step_backward_reaches_heads_and_tied_embedding():
    torch.manual_seed(0)
    cfg = ModelConfig(hidden_size=32, num_layers=2, num_heads=2, image_size=16, patch_size=8, vocab_size=60,
                      max_text_len=8, num_fusion_layers=1, moe=MoEConfig(num_experts=2, min_capacity=1))
    model = VLMoE(cfg)
    heads = nn.ModuleDict({"itc": ITCHead(32), "itm": ITMHead(32), "mlm": MLMHead(model.token_embedding)})
    assert heads["mlm"].token_embedding.weight is model.token_embedding.weight
    ids = torch.randint(5, 60, (4, 8))
    mask = torch.ones_like(ids)
    mlm_ids, mlm_labels = mask_tokens(ids, mask, SPECIALS, 4, 60, prob=0.5)
    batch = dict(pixel_values=torch.randn(4, 3, 16, 16), input_ids=ids, attention_mask=mask,
                 mlm_input_ids=mlm_ids, mlm_labels=mlm_labels)
    out = vl_pretrain_losses(model, heads, batch, {"itc": 1, "itm": 1, "mlm": 1})
    assert set(out) == {"loss", "terms"} and set(out["terms"]) >= {"itc", "itm", "mlm"}
    out["loss"].backward()
    assert heads["itc"].logit_scale.grad is not None and heads["itm"].classifier.weight.grad is not None
    assert model.token_embedding.weight.grad.abs().sum() > 0
