"""Local attention (``model.attention: local``): exact against dense attention under an independently built
mask, whole-grid windows == dense, global tokens, padding, shifted windows, decoding and FLOP accounting."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.model.blocks import Segment
from pipeline.model.config import ModelConfig
from pipeline.model.sparse_attention import attention_pairs, attention_rows, build_local_layout, local_attention
from pipeline.model.vlmoe import VLMoE

CPU = torch.device("cpu")


def tiny(attention: str = "dense", window: int = 8, **kw) -> VLMoE:
    """No MoE layer: DeepSpeed's gate is random even in eval (top-2 Gumbel), which would hide differences."""
    torch.manual_seed(0)
    settings = dict(hidden_size=48, num_heads=4, num_layers=4, num_fusion_layers=1, image_size=32, patch_size=4,
                    modalities=["image", "text", "audio"], moe={"every": 0}, attention=attention,
                    attention_window=window, init_std=0.2)
    cfg = ModelConfig(**{**settings, **kw})
    return VLMoE(cfg).eval()


def inputs() -> dict:
    torch.manual_seed(1)
    ids = torch.randint(5, 100, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 4:] = 0
    audio = torch.randn(2, 400, 64)
    return {"image": (torch.randn(2, 3, 32, 32),), "text": (ids, mask), "audio": (audio, torch.tensor([400, 150]))}


def reference_mask(cfg: ModelConfig, segments: list[Segment], valid_bn, causal: bool, prefix, shifted: bool):
    """[B, N, N] allowed pairs written from the definition: a grid token sees the grid tokens of its group and
    the global tokens the dense rule lets it see; a global token sees what the dense rule lets it see. Group
    (Swin): on the canvas padded to window multiples and rolled back by the shift, the same window and, within
    it, the same region (Swin's slices [0, -w), [-w, -s), [-s, end) of each axis)."""
    dense = attention_rows(segments, valid_bn, 2, causal, CPU, prefix)
    group_of = {}

    def axis(pos: int, size: int, win: int, shift: int) -> tuple[int, int]:
        padded = -(-size // win) * win
        rolled = (pos - shift) % padded
        return rolled // win, int(rolled >= padded - win) + int(shift > 0 and rolled >= padded - shift)

    for seg in segments:
        if seg.modality == "text":
            continue
        patches = seg.end - seg.start - cfg.lead_tokens
        rows = 4 if seg.modality == "audio" else int(patches ** 0.5)
        cols = patches // rows
        wr = rows if seg.modality == "audio" else min(rows, cfg.attention_window)
        wc = min(cols, cfg.attention_window)
        sr = wr // 2 if shifted and wr < rows else 0
        sc = wc // 2 if shifted and wc < cols else 0
        for t in range(patches):
            r, c = divmod(t, cols)
            group_of[seg.start + cfg.lead_tokens + t] = (seg.modality, axis(r, rows, wr, sr), axis(c, cols, wc, sc))
    allowed = dense.clone()
    for q, group in group_of.items():
        for k, other in group_of.items():
            if other != group:
                allowed[:, q, k] = False
    return allowed


@pytest.mark.parametrize("window,shifted,causal,summary", [(3, False, False, 0), (3, True, False, 0),
                                                           (2, True, True, 0), (5, True, True, 0), (3, True, True, 2)])
def test_local_attention_equals_dense_attention_under_the_window_mask(window, shifted, causal, summary):
    """Gather-into-windows + SDPA gives exactly masked dense SDPA with the mask built from the definition,
    outputs and gradients, with a grid not a multiple of the window, shifted windows, text and audio padding,
    a causal prefix, two grid modalities and summary tokens (global, after each CLS)."""
    cfg = tiny("local", window, summary_tokens=summary).cfg
    lead = 1 + summary
    image, text = lead + 49, lead + 49 + 7  # ends: 7x7 image patches, 7 text tokens, then 4x5 audio patches
    n = text + lead + 20
    segments = [Segment("image", 0, image, None), Segment("text", image, text, None), Segment("audio", text, n, None)]
    valid = torch.ones(2, n, dtype=torch.bool)
    valid[1, image + 4:text] = False  # text padding
    valid[1, text + lead + 10:] = False  # audio padding (4 rows x 5 time patches, frequency-major)
    prefix = torch.tensor([2, 3]) if causal else None
    layout = build_local_layout(cfg, segments, valid, 2, causal, CPU, prefix, shifted)
    torch.manual_seed(0)
    qkv = torch.randn(2, n, 3, 4, 8, requires_grad=True)
    got = local_attention(qkv, layout, 0.0)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    allowed = reference_mask(cfg, segments, valid, causal, prefix, shifted)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None]).transpose(1, 2).reshape(2, n, 32)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    grad = torch.randn_like(got)
    (g_got,) = torch.autograd.grad(got, qkv, grad, retain_graph=True)
    (g_want,) = torch.autograd.grad(want, qkv, grad)
    torch.testing.assert_close(g_got, g_want, atol=1e-5, rtol=1e-5)
    assert layout.groups[0].index_wl.shape[1] == min(window, 7) ** 2


@pytest.mark.parametrize("causal,summary", [(False, 0), (True, 0), (False, 2)])
def test_a_window_covering_the_whole_grid_is_dense_attention(causal, summary):
    """Window 30 >= the 8x8 image grid and the 25 audio time patches: image + text and audio + text passes of
    the local model give the dense model's hidden states and gradients (text padding, audio padding, with and
    without a causal prefix; with qk_norm; with summary tokens). (Two grid modalities in one pass are two windows:
    an image patch reaches an audio patch through the global tokens only.)"""
    dense = tiny(qk_norm=True, summary_tokens=summary)
    local = tiny("local", 30, qk_norm=True, summary_tokens=summary)
    local.load_state_dict(dense.state_dict())
    kw = {"causal": causal, "text_prefix": torch.tensor([3, 2]) if causal else None}
    for pair in (("image", "text"), ("audio", "text")):
        x = {k: v for k, v in inputs().items() if k in pair}
        a, b = dense.encode(x, **kw).hidden, local.encode(x, **kw).hidden
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        a.square().sum().backward()
        b.square().sum().backward()
    for (name, p), q in zip(dense.named_parameters(), local.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, atol=1e-4, rtol=1e-4, msg=name)


def test_global_tokens_see_everything_and_windows_see_only_their_window():
    """One local block (no shift), window 2 on the 8x8 grid: changing the bottom-right patch changes the CLS
    and every text token, but no patch outside its window; changing a text token changes every patch."""
    model = tiny("local", 2, num_layers=1, num_fusion_layers=0, attention_shift=False)
    pixels = torch.randn(1, 3, 32, 32)
    ids = torch.randint(5, 100, (1, 5))
    base = model.fuse(pixels, ids).hidden
    moved = pixels.clone()
    moved[..., 28:, 28:] += 3.0  # patch (7, 7): token 1 + 63
    out = model.fuse(moved, ids).hidden
    changed = (out - base).abs().amax(-1)[0] > 1e-6
    window = {1 + r * 8 + c for r in (6, 7) for c in (6, 7)}
    assert changed[0] and changed[65:].all()  # CLS and all text
    assert {i for i in range(1, 65) if changed[i]} == window
    other_ids = ids.clone()
    other_ids[0, 2] += 1
    out = model.fuse(pixels, other_ids).hidden
    assert ((out - base).abs().amax(-1)[0, 1:65] > 1e-6).all()


def test_summary_tokens_see_every_patch_and_every_patch_sees_them():
    """One local block (window 2, no shift), image only, 2 summary tokens after the CLS (tokens 1, 2): moving
    the bottom-right patch changes the CLS and both summary tokens but no patch outside its window; changing a
    summary token's learned vector changes every patch."""
    model = tiny("local", 2, num_layers=1, num_fusion_layers=0, attention_shift=False, summary_tokens=2)
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        base = model.encode_image(pixels).hidden
        assert base.shape[1] == 3 + 64
        moved = pixels.clone()
        moved[..., 28:, 28:] += 3.0  # patch (7, 7): token 3 + 63
        changed = (model.encode_image(moved).hidden - base).abs().amax(-1)[0] > 1e-6
        assert changed[:3].all()
        assert {i for i in range(3, 67) if changed[i]} == {3 + r * 8 + c for r in (6, 7) for c in (6, 7)}
        model.summary["image"][:, 1] += torch.randn(48)  # not a constant: LayerNorm would remove that
        changed = (model.encode_image(pixels).hidden - base).abs().amax(-1)[0] > 1e-6
        assert changed.all()


def test_padding_is_never_attended():
    """Whatever the padded text tokens and padded audio patches hold, no valid token's output changes."""
    model = tiny("local", 2)
    x = inputs()
    base = model.encode(x).hidden
    ids, mask = x["text"]
    x["text"] = (torch.where(mask.bool(), ids, torch.randint(5, 100, ids.shape)), mask)
    audio, lengths = x["audio"]
    x["audio"] = (torch.where(torch.arange(400)[None, :, None] < lengths[:, None, None], audio, 50.0), lengths)
    out = model.encode(x).hidden
    valid = model.encode(x).token_mask
    assert not valid.all()
    torch.testing.assert_close(out[valid], base[valid], atol=1e-5, rtol=1e-5)


def test_shifted_windows_carry_information_across_window_borders():
    """Window 2 on the 8x8 grid: unshifted, patch (1,1) shares a window with (0,0), not with (2,2); shifted
    (cyclic, by 1), (1,1) attends (2,2) and no longer (0,0), and the wrapped-around corner keeps (0,0) apart
    from (7,7), which share a window slot-wise. Both use 16 windows (a cyclic shift adds none)."""
    cfg = tiny("local", 2).cfg
    segments = [Segment("image", 0, 65, None)]
    token = lambda r, c: 1 + r * 8 + c  # noqa: E731
    sees = {}
    for shifted in (False, True):
        layout = build_local_layout(cfg, segments, None, 1, False, CPU, None, shifted)
        (group,) = layout.groups
        assert group.index_wl.shape == (16, 4)
        allowed = set()
        for w, slots in enumerate(group.index_wl.tolist()):
            for i, q in enumerate(slots):
                for j, k in enumerate(slots):
                    if group.mask_bwlm is None or group.mask_bwlm[0, w, i, j]:
                        allowed.add((q, k))
        sees[shifted] = allowed
    assert (token(1, 1), token(0, 0)) in sees[False] and (token(1, 1), token(2, 2)) not in sees[False]
    assert (token(1, 1), token(2, 2)) in sees[True] and (token(1, 1), token(0, 0)) not in sees[True]
    assert (token(0, 0), token(7, 7)) not in sees[True] and (token(0, 7), token(0, 0)) not in sees[True]
    assert (token(0, 0), token(0, 0)) in sees[True]


def test_cached_decoding_with_local_attention_matches_full_passes():
    """Text queries are global: a decoded token attends the whole cached prefix, as the full causal pass does."""
    from pipeline.model.generation import DecodeOptions, generate
    from pipeline.model.heads import MLMHead
    model = tiny("local", 2)
    head = MLMHead(model.token_embedding).eval()
    ids, mask = torch.tensor([[1, 5, 7], [1, 9, 0]]), torch.tensor([[1, 1, 1], [1, 1, 0]])
    pixels = torch.randn(2, 3, 32, 32)
    outs = [generate(model, head, {"image": (pixels,)}, ids, mask, eos_token_id=2, pad_token_id=0,
                     options=DecodeOptions(max_new_tokens=5, min_new_tokens=5, use_cache=cache))
            for cache in (True, False)]
    assert torch.equal(outs[0].tokens, outs[1].tokens)
    torch.testing.assert_close(outs[0].scores, outs[1].scores, atol=1e-4, rtol=1e-4)


def test_attention_pairs_and_flops_follow_the_option():
    from pipeline.model.accounting import count_parameters
    tokens = {"image": 1 + 32 * 32, "text": 32}
    n = sum(tokens.values())
    dense = ModelConfig(image_size=256, patch_size=8)
    local = ModelConfig(image_size=256, patch_size=8, attention="local", attention_window=8,
                        attention_global_layers=[5])
    assert attention_pairs(dense, 0, tokens) == n * n
    g = 1 + 32
    assert attention_pairs(local, 0, tokens) == g * n + 1024 * (64 + g)  # 16 windows of 8x8, no padding
    assert attention_pairs(local, 1, tokens) == g * n + 1024 * (64 + g)  # shifted: as many windows (cyclic)
    odd = ModelConfig(image_size=240, patch_size=8, attention="local", attention_window=8)  # 30x30: padded to 32
    assert attention_pairs(odd, 1, {"image": 901, "text": 32}) == g * 933 + 1024 * (64 + g)
    assert attention_pairs(local, 5, tokens) == n * n  # a global layer
    whole = ModelConfig(image_size=256, patch_size=8, attention="local", attention_window=32)
    assert attention_pairs(whole, 1, tokens) == n * n  # one window: the dense count
    f_dense = count_parameters(dense).forward_flops_per_sample
    f_local = count_parameters(local).forward_flops_per_sample
    assert f_local < f_dense
    d = dense.hidden_size
    saved = 4 * d * sum(n * n - attention_pairs(local, i, tokens) for i in range(6))
    assert f_dense - f_local == pytest.approx(saved, rel=1e-9)


def test_bad_attention_settings_are_refused():
    with pytest.raises(ValueError, match="attention_global_layers"):
        ModelConfig(num_layers=4, attention="local", attention_global_layers=[4])
    with pytest.raises(ValueError, match="attention_window"):
        ModelConfig(attention="local", attention_window=0)
    with pytest.raises(ValueError, match="summary_tokens"):
        ModelConfig(summary_tokens=-1)
