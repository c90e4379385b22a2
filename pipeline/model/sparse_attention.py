"""Local (windowed) attention with global tokens: ``model.attention: local``.

Shapes: B batch, N tokens of the joint sequence, H heads, K head dim, D = H*K, G global tokens,
W windows of one grid, L tokens per window (window rows x window columns).

Which tokens are local: the patches of a grid modality (image: side x side patches, row-major; audio:
frequency x time patches, frequency-major), each segment's tokens after its CLS and its
``summary_tokens``. Every other token is global: the CLS and summary tokens of each grid modality and all
text tokens (the text of a fused pass is short and is what
the patches must reach). A global query attends every token it may (the rows of ``attention_rows``, the
dense mask); a local query attends the tokens of its window and the global keys it may see. So a window
covering the whole grid is dense attention, and the cost of a grid of P patches is P x (L + G) pairs
instead of P x N.

Windows (Swin, Liu et al. 2021): the image grid is cut into ``attention_window`` x ``attention_window``
squares; the audio grid into every frequency row x ``attention_window`` time columns (1-D windows along
time). With ``attention_shift`` the windows of odd blocks are shifted by half a window along each axis the
grid is larger than the window on (Swin's cyclic shift: same number of windows, wrapped regions masked from
each other), so information crosses window borders every other block. A grid that is not a multiple of the
window is padded with slots that are never attended; the padding of a modality (``valid`` False) is never
attended either.

Real work, not a dense mask: the window tokens are gathered into [B*W, H, L, K] and one
``scaled_dot_product_attention`` call runs over them with their G global keys appended; the G global
queries run one call over all N keys. ``attention_pairs`` counts the (query, key) pairs each option
computes (accounting and the planner).
"""
from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from pipeline.model.blocks import Segment
    from pipeline.model.config import ModelConfig


@dataclasses.dataclass
class WindowGroup:
    """The windows of one grid segment: ``index_wl`` [W, L] token of the joint sequence in each window slot
    (padding slots hold token 0 and are masked), ``mask_bwlm`` [B, W, L, L+G] True = may attend (window
    keys, then the global keys), None when every slot may attend every key; ``keys_wm`` [W, L+G]: index_wl
    then the global tokens (the keys of each window)."""

    index_wl: torch.Tensor
    mask_bwlm: torch.Tensor | None
    keys_wm: torch.Tensor


@dataclasses.dataclass
class LocalLayout:
    """What one local-attention block needs, built once per pass for each shift (``attention_layouts``)."""

    global_g: torch.Tensor  # [G] indices of the global tokens
    global_mask_b1gn: torch.Tensor | None  # the dense mask's rows of the global queries
    groups: list[WindowGroup]
    inverse_n: torch.Tensor  # [N] row of each token in cat(global outputs, every group's window slots)


def token_grid(cfg: ModelConfig, segment: Segment) -> tuple[int, int] | None:
    """(rows, columns) of the patches after a grid modality's CLS and summary tokens; None for text."""
    patches = segment.end - segment.start - cfg.lead_tokens
    if segment.modality == "image":
        side = math.isqrt(patches)
        return side, side
    if segment.modality == "audio":
        freq = cfg.audio.grid(cfg.audio.patch_time)[0]
        return freq, patches // freq
    return None


def window_shape(cfg: ModelConfig, modality: str, grid: tuple[int, int], shifted: bool
                 ) -> tuple[tuple[int, int], tuple[int, int]]:
    """((window rows, window columns), (shift rows, shift columns)) of a grid: a window never exceeds the
    grid, and an axis the window covers whole is not shifted (Swin does the same)."""
    rows, cols = grid
    win = (rows if modality == "audio" else min(rows, cfg.attention_window), min(cols, cfg.attention_window))
    shift = tuple(w // 2 if shifted and w < g else 0 for w, g in zip(win, grid))
    return win, shift  # type: ignore[return-value]


def window_partition(grid: tuple[int, int], win: tuple[int, int], shift: tuple[int, int]
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """([W, L] grid index (row-major) of every window slot, -1 for padding; [W, L] region of every slot, or
    None without shift). As Swin does: the grid is padded at the bottom and right to multiples of the window,
    rolled up and left by ``shift`` (cyclic shift: as many windows as without shift) and cut into windows; a
    window that wraps around holds tokens of up to 4 regions of the canvas, and a token attends only the
    tokens of its own region (Swin's attention mask: slices [0, -w), [-w, -s), [-s, end) of each axis)."""
    (rows, cols), (wr, wc), (sr, sc) = grid, win, shift
    canvas_r, canvas_c = -(-rows // wr) * wr, -(-cols // wc) * wc
    canvas = torch.full((canvas_r, canvas_c), -1, dtype=torch.long)
    canvas[:rows, :cols] = torch.arange(rows * cols).view(rows, cols)

    def cut(x: torch.Tensor) -> torch.Tensor:
        return x.view(canvas_r // wr, wr, canvas_c // wc, wc).permute(0, 2, 1, 3).reshape(-1, wr * wc)

    if not (sr or sc):
        windows = cut(canvas)
        return windows[(windows >= 0).any(dim=1)], None
    canvas = torch.roll(canvas, shifts=(-sr, -sc), dims=(0, 1))
    r, c = torch.arange(canvas_r), torch.arange(canvas_c)
    region_r = (r >= canvas_r - wr).long() + (sr > 0) * (r >= canvas_r - sr).long()
    region_c = (c >= canvas_c - wc).long() + (sc > 0) * (c >= canvas_c - sc).long()
    windows, regions = cut(canvas), cut(region_r[:, None] * 3 + region_c[None, :])
    keep = (windows >= 0).any(dim=1)
    return windows[keep], regions[keep]


def attention_rows(segments: list[Segment], valid_bn: torch.Tensor | None, batch: int, causal: bool,
                   device: torch.device, text_prefix_b: torch.Tensor | None = None,
                   rows_q: torch.Tensor | None = None) -> torch.Tensor:
    """[B, Q, N] bool (True = query may attend key) for queries ``rows_q`` (default all N tokens); the rules
    are ``blocks.attention_mask``'s."""
    n = segments[-1].end
    rows_q = torch.arange(n, device=device) if rows_q is None else rows_q.to(device)
    keys_n = torch.arange(n, device=device)
    if valid_bn is None:
        allowed_bqn = torch.ones(batch, len(rows_q), n, dtype=torch.bool, device=device)
    else:
        allowed_bqn = valid_bn[:, None, :].expand(batch, len(rows_q), n).clone()
    text = next((s for s in segments if s.modality == "text"), None)
    if causal and text is not None:
        is_text_n = (keys_n >= text.start) & (keys_n < text.end)
        pos_n = keys_n - text.start  # position within the text (meaningful where is_text_n)
        prefix_bn = torch.zeros(batch, n, dtype=torch.bool, device=device)
        if text_prefix_b is not None:
            prefix_bn = is_text_n[None] & (pos_n[None] < text_prefix_b.to(device)[:, None])
        q_text_q, q_pos_q = is_text_n[rows_q], pos_n[rows_q]
        earlier_qn = q_text_q[:, None] & (pos_n[None] <= q_pos_q[:, None])
        sees_bqn = ~is_text_n[None, None] | prefix_bn[:, None, :] | earlier_qn[None]
        allowed_bqn &= sees_bqn
    allowed_bqn |= rows_q[:, None] == keys_n[None]
    return allowed_bqn


def build_local_layout(cfg: ModelConfig, segments: list[Segment], valid_bn: torch.Tensor | None, batch: int,
                       causal: bool, device: torch.device, text_prefix_b: torch.Tensor | None,
                       shifted: bool) -> LocalLayout | None:
    """The layout of a local block (None when no segment has a grid: every token is global, i.e. dense)."""
    n = segments[-1].end
    is_local_n = torch.zeros(n, dtype=torch.bool)
    windows = []
    for seg in segments:
        grid = token_grid(cfg, seg)
        if grid is None or grid[0] * grid[1] == 0:
            continue
        win, shift = window_shape(cfg, seg.modality, grid, shifted)
        slots_wl, region_wl = window_partition(grid, win, shift)
        first = seg.start + cfg.lead_tokens
        windows.append((torch.where(slots_wl >= 0, slots_wl + first, -1), region_wl))
        is_local_n[first:seg.end] = True
    if not windows:
        return None
    global_g = (~is_local_n).nonzero().squeeze(1)
    rows = attention_rows(segments, valid_bn, batch, causal, device, text_prefix_b, global_g)
    global_mask = None if bool(rows.all()) else rows[:, None]
    # what a local (grid) query may see of the global keys: valid ones, and with ``causal`` no text key
    # outside the prefix (the row of any grid token says it; they are all alike)
    some_local = int(is_local_n.nonzero()[0])
    global_ok_bg = attention_rows(segments, valid_bn, batch, causal, device, text_prefix_b,
                                  torch.tensor([some_local]))[:, 0, global_g.to(device)]
    groups, offset = [], len(global_g)
    inverse_n = torch.empty(n, dtype=torch.long)
    inverse_n[global_g] = torch.arange(len(global_g))
    for slots_wl, region_wl in windows:
        real_wl = slots_wl >= 0
        inverse_n[slots_wl[real_wl]] = offset + real_wl.flatten().nonzero().squeeze(1)
        offset += slots_wl.numel()
        index_wl = slots_wl.clamp(min=0).to(device)
        real_wl = real_wl.to(device)
        key_ok_bwl = real_wl[None].expand(batch, -1, -1)
        if valid_bn is not None:
            key_ok_bwl = key_ok_bwl & valid_bn[:, index_wl]
        mask = None
        if region_wl is not None or not (bool(key_ok_bwl.all()) and bool(global_ok_bg.all())):
            w, L = index_wl.shape
            window_bwll = key_ok_bwl[:, :, None, :].expand(batch, w, L, L)
            if region_wl is not None:
                region_wl = region_wl.to(device)
                window_bwll = window_bwll & (region_wl[:, :, None] == region_wl[:, None, :])[None]
            mask = torch.cat([window_bwll, global_ok_bg[:, None, None, :].expand(batch, w, L, len(global_g))],
                             dim=3).clone()
            mask[..., :L] |= torch.eye(L, dtype=torch.bool, device=device)  # a slot sees itself: no empty row
        keys_wm = torch.cat([index_wl, global_g.to(device)[None].expand(len(index_wl), -1)], dim=1)
        groups.append(WindowGroup(index_wl, mask, keys_wm))
    return LocalLayout(global_g.to(device), global_mask, groups, inverse_n.to(device))


def local_attention(qkv_bn3hk: torch.Tensor, layout: LocalLayout, dropout_p: float) -> torch.Tensor:
    """Attention of the packed projections [B, N, 3, H, K] under ``layout`` -> [B, N, D]. Each window group is
    one gather of its window tokens and the global tokens ([B, W, L+G, 3, H, K]); the queries are its first L
    slots and the keys/values all L+G, as strided views (no concatenation). Tensors are split with ``unbind``:
    the backward of a select allocates and zero-fills a full-size gradient, which cost a fifth of the pass
    (BENCHMARKS.md, "Long visual sequences")."""
    b, n, _, h, k = qkv_bn3hk.shape
    g = len(layout.global_g)
    outs = []
    if g:
        _, k_bnhk, v_bnhk = qkv_bn3hk.unbind(2)
        q_bghk = qkv_bn3hk[:, layout.global_g, 0]
        out_bhgk = F.scaled_dot_product_attention(q_bghk.transpose(1, 2), k_bnhk.transpose(1, 2),
                                                  v_bnhk.transpose(1, 2), attn_mask=layout.global_mask_b1gn,
                                                  dropout_p=dropout_p)
        outs.append(out_bhgk.transpose(1, 2).reshape(b, g, h * k))
    for group in layout.groups:
        w, L = group.index_wl.shape
        m = group.keys_wm.shape[1]
        q_bwmhk, k_bwmhk, v_bwmhk = qkv_bn3hk[:, group.keys_wm].unbind(3)  # [B, W, L+G, H, K] each
        q_whlk = q_bwmhk[:, :, :L].permute(0, 1, 3, 2, 4).reshape(b * w, h, L, k)
        k_whmk = k_bwmhk.permute(0, 1, 3, 2, 4).reshape(b * w, h, m, k)
        v_whmk = v_bwmhk.permute(0, 1, 3, 2, 4).reshape(b * w, h, m, k)
        mask = None if group.mask_bwlm is None else group.mask_bwlm.reshape(b * w, 1, L, m)
        out = F.scaled_dot_product_attention(q_whlk, k_whmk, v_whmk, attn_mask=mask, dropout_p=dropout_p)
        outs.append(out.view(b, w, h, L, k).permute(0, 1, 3, 2, 4).reshape(b, w * L, h * k))
    return torch.cat(outs, dim=1)[:, layout.inverse_n]


def attention_pairs(cfg: ModelConfig, index: int, tokens: dict[str, int]) -> int:
    """(query, key) pairs block ``index`` computes for one sample of ``tokens`` (modality -> count, in
    sequence order): N^2 dense; local: G x N for the global queries plus W x L x (L + G) per grid (padding
    slots included: they are computed)."""
    from pipeline.model.blocks import Segment
    n = sum(tokens.values())
    if not cfg.local_attention_block(index):
        return n * n
    segments, start = [], 0
    for modality, count in tokens.items():
        segments.append(Segment(modality, start, start + count, None))
        start += count
    grids = [(seg, token_grid(cfg, seg)) for seg in segments]
    grids = [(seg, grid) for seg, grid in grids if grid is not None and grid[0] * grid[1]]
    if not grids:
        return n * n
    g = n - sum(grid[0] * grid[1] for _, grid in grids)
    pairs = g * n
    for seg, grid in grids:
        win, shift = window_shape(cfg, seg.modality, grid, shifted=cfg.shifted_attention_block(index))
        slots = window_partition(grid, win, shift)[0].numel()
        pairs += slots * (win[0] * win[1] + g)
    return pairs


def attention_layouts(cfg: ModelConfig, segments: list[Segment], valid_bn: torch.Tensor | None, batch: int,
                      causal: bool, device: torch.device, text_prefix_b: torch.Tensor | None
                      ) -> list[LocalLayout | None]:
    """Per block: its local layout, or None for a dense block (or a pass with no grid segment)."""
    cache: dict[bool, LocalLayout | None] = {}
    layouts: list[LocalLayout | None] = []
    for index in range(cfg.num_layers):
        if not cfg.local_attention_block(index):
            layouts.append(None)
            continue
        shifted = cfg.shifted_attention_block(index)
        if shifted not in cache:
            cache[shifted] = build_local_layout(cfg, segments, valid_bn, batch, causal, device, text_prefix_b,
                                                shifted)
        layouts.append(cache[shifted])
    return layouts
