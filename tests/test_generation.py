"""Decoding (pipeline.model.generation): the KV cache reproduces full recomputation token for token, greedy
and beam; beam search is exact when the beam covers every sequence; min/max length, EOS and padding."""
from __future__ import annotations

import itertools

import pytest
import torch

from pipeline.model.config import ModelConfig
from pipeline.model.generation import DecodeOptions, dropless, generate
from pipeline.model.heads import MLMHead
from pipeline.model.vlmoe import VLMoE

EOS, PAD, BOS = 2, 0, 1


def tiny(vocab: int = 40, seed: int = 0, **moe) -> tuple[VLMoE, MLMHead]:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=vocab, max_text_len=20, hidden_size=48, num_heads=4, num_layers=4, image_size=32,
                      init_std=0.2, moe={"num_experts": 4, "every": 2, **moe})
    model = VLMoE(cfg).eval()
    head = MLMHead(model.token_embedding).eval()
    with torch.no_grad():
        head.bias[EOS] = 0.5  # sequences end at different steps
        head.bias[PAD] = -1e4  # as a trained model: padding is never predicted
    return model, head


def prompts() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.tensor([[BOS, 5, 7, 9], [BOS, 0, 0, 0], [BOS, 11, 0, 0], [BOS, 3, 4, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0]])
    return ids, mask


def run(model, head, beams: int, cache: bool, bidirectional: bool = False, **kw):
    ids, mask = prompts()
    torch.manual_seed(1)
    pixels = torch.randn(ids.shape[0], 3, 32, 32)
    options = DecodeOptions(num_beams=beams, max_new_tokens=kw.pop("max_new_tokens", 10), use_cache=cache, **kw)
    return generate(model, head, {"image": (pixels,)}, ids, mask, eos_token_id=EOS, pad_token_id=PAD,
                    options=options, prompt_bidirectional=bidirectional)


@pytest.mark.parametrize("beams", [1, 3])
@pytest.mark.parametrize("top_k,bidirectional", [(1, False), (2, False), (1, True)])
def test_cached_decoding_gives_exactly_the_tokens_of_recomputing_the_prefix(beams, top_k, bidirectional):
    model, head = tiny(top_k=top_k)
    cached = run(model, head, beams, True, bidirectional)
    full = run(model, head, beams, False, bidirectional)
    assert torch.equal(cached.tokens, full.tokens)
    assert torch.equal(cached.lengths, full.lengths)
    torch.testing.assert_close(cached.scores, full.scores, rtol=1e-4, atol=1e-4)
    lengths = cached.lengths.tolist()
    assert len(set(lengths)) > 1 and min(lengths) < 10, lengths  # EOS came at different steps: padding exercised
    for row, n in zip(cached.tokens.tolist(), lengths):
        assert EOS not in row[:n] and all(t == PAD for t in row[n:])


def test_one_beam_is_greedy_and_min_max_length_hold():
    model, head = tiny()
    greedy, one_beam = run(model, head, 1, True), run(model, head, 1, True)
    beam1 = run(model, head, 2, True, length_penalty=0.0)
    assert torch.equal(greedy.tokens, one_beam.tokens)
    assert beam1.scores.ge(greedy.scores - 1e-4).all()  # lp 0: beam's log-prob is never below greedy's here
    at_least = run(model, head, 1, True, min_new_tokens=6)
    assert at_least.lengths.min() >= 6
    short = run(model, head, 3, True, max_new_tokens=2, min_new_tokens=2)
    assert short.tokens.shape[1] <= 2 and short.lengths.eq(2).all()


def test_beam_search_covering_every_sequence_finds_the_most_likely_one():
    """Vocab 5 (+ EOS), 3 tokens at most, beams >= every live prefix: beam search must return the exact argmax
    over all sequences (ended by EOS or cut at max length), scored with length_penalty 0."""
    model, head = tiny(vocab=6, seed=3, min_capacity=1)
    with torch.no_grad():
        head.bias[BOS] = -1e4
    ids, mask = torch.tensor([[BOS]]), torch.tensor([[1]])
    pixels = torch.randn(1, 3, 32, 32)
    got = generate(model, head, {"image": (pixels,)}, ids, mask, eos_token_id=EOS, pad_token_id=PAD,
                   options=DecodeOptions(num_beams=16, max_new_tokens=3, min_new_tokens=0, length_penalty=0.0))

    @torch.no_grad()
    def logp(seq: list[int]) -> float:
        full = torch.tensor([[BOS, *seq[:-1]]])
        with dropless(model):  # generate's routing: no token dropped
            out = model.encode({"image": (pixels,), "text": (full, torch.ones_like(full))}, causal=True)
        text = out.hidden[:, out.spans["text"][0]:]
        scores = torch.log_softmax(head(text).float(), -1)[0]
        return float(sum(scores[i, t] for i, t in enumerate(seq)))

    live = [3, 4, 5]
    candidates = [list(p) + [EOS] for n in range(3) for p in itertools.product(live, repeat=n)]
    candidates += [list(p) for p in itertools.product(live, repeat=3)]
    best = max(candidates, key=logp)
    expected = best[:-1] if best[-1] == EOS else best
    assert got.tokens[0, :got.lengths[0]].tolist() == expected
    assert abs(float(got.scores[0]) - logp(best)) < 1e-4


def test_small_batches_decode_through_moe_and_gates_keep_their_settings():
    """A step of 1 token is below moe.min_capacity (4): it is padded inside the MoE call, not an error; the
    gates drop no tokens while decoding and get their drop_tokens back afterwards."""
    model, head = tiny()
    gates = [f.deepspeed_moe.gate for f in model.sparse_ffns().values()]
    assert all(g.drop_tokens for g in gates)
    ids, mask = torch.tensor([[BOS]]), torch.tensor([[1]])
    pixels = torch.randn(1, 3, 32, 32)
    outs = [generate(model, head, {"image": (pixels,)}, ids, mask, eos_token_id=EOS, pad_token_id=PAD,
                     options=DecodeOptions(max_new_tokens=4, use_cache=cache)) for cache in (True, False)]
    assert outs[0].tokens.shape[0] == 1 and all(g.drop_tokens for g in gates)
    assert torch.equal(outs[0].tokens, outs[1].tokens)


def test_bad_prompts_are_refused_with_a_clear_error():
    model, head = tiny()
    with pytest.raises(ValueError, match="right-padded"):
        generate(model, head, {}, torch.tensor([[0, BOS]]), torch.tensor([[0, 1]]), eos_token_id=EOS,
                 pad_token_id=PAD)
    with pytest.raises(ValueError, match="min_new_tokens"):
        DecodeOptions(max_new_tokens=2, min_new_tokens=3)


def test_prefix_lm_mask_prefix_sees_itself_both_ways_and_never_what_follows():
    """text_prefix P: prefix tokens attend each other (both ways) and never a later token; a later token
    attends the whole prefix and the tokens before it; media tokens see the prefix, nothing after it."""
    from pipeline.model.blocks import Segment, attention_mask

    segments = [Segment("image", 0, 2, None), Segment("text", 2, 7, None)]
    mask = attention_mask(segments, None, 2, True, torch.device("cpu"), torch.tensor([3, 1]))[:, 0]
    text = mask[:, 2:, 2:]
    assert text[0, :3, :3].all() and not text[0, :3, 3:].any()  # row 0: prefix of 3
    assert text[0, 3].tolist() == [True] * 4 + [False] and text[0, 4].all()
    assert torch.equal(text[1], torch.ones(5, 5, dtype=torch.bool).tril())  # P = 1: the causal mask
    assert mask[:, 2:, :2].all()  # text sees the media
    assert mask[0, :2, 2:5].all() and not mask[0, :2, 5:].any() and mask[1, :2, 2].all()  # media: the prefix
    plain = attention_mask(segments, None, 2, True, torch.device("cpu"))[:, 0]
    assert not plain[:, :2, 2:].any()  # without a prefix the media see no text


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_prefix_pass_gives_the_prefix_what_a_pass_over_the_prefix_alone_gives(pooling):
    """VQA's one-pass training: image + "question answer" with the question as prefix gives the classifier
    (cls / pooled) and every prefix token exactly what image + question alone gives (no MoE drops)."""
    model, _ = tiny()
    model.cfg.pooling = pooling
    torch.manual_seed(2)
    pixels = torch.randn(2, 3, 32, 32)
    full = torch.tensor([[BOS, 5, 7, 9, 12, 13], [BOS, 11, 14, 15, 0, 0]])
    full_mask = (full != 0).long()
    prefix_b = torch.tensor([3, 2])
    question = torch.where(torch.arange(6)[None] < prefix_b[:, None], full, 0)
    with torch.no_grad(), dropless(model):
        joint = model.encode({"image": (pixels,), "text": (full, full_mask)}, causal=True, text_prefix=prefix_b)
        alone = model.encode({"image": (pixels,), "text": (question, (question != 0).long())})
        causal = model.encode({"image": (pixels,), "text": (full, full_mask)}, causal=True)
    torch.testing.assert_close(joint.pooled, alone.pooled, rtol=1e-5, atol=1e-5)
    start = joint.spans["text"][0]
    for b, p in enumerate(prefix_b.tolist()):
        torch.testing.assert_close(joint.hidden[b, :start + p], alone.hidden[b, :start + p], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(causal.pooled, alone.pooled, atol=1e-3)  # a causal question would differ
    with pytest.raises(ValueError, match="causal"):
        model.encode({"text": (full, full_mask)}, text_prefix=prefix_b)
