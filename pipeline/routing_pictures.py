"""Routing pictures: which expert took each image patch and each text token of a ``VLMoE`` forward pass.

One implementation for ``pipeline.explain`` (an exported model, local experts) and for the trainer's TensorBoard
images (``train.routing_images``: DeepSpeed's MoE layers, expert parallel): ``RoutingRecorder`` hooks the MoE
gates for one pass, ``draw_routing`` draws one sample of it, ``draw_stats`` the statistics over a data split, and
``log_routing_images`` is the trainer's evaluation hook. Importing this module imports neither ``deepspeed`` nor
the data loader, nor torch until a function needs it (``pipeline.explain --help`` stays fast).

A routing picture has one column per MoE layer: the image as the model saw it with each patch tinted by the
colour of its expert (a solid dot of that colour at the patch centre, black = dropped over capacity), the image
CLS and text tokens as boxes of the same colours, and a legend of token counts per expert for each MoE FFN
(image and text FFNs have their own experts: the same colour is a different expert in each). With top-2 the
first choice is shown. Dropless FFNs (``moe.impl: dropless``) are recorded from their router (real tokens only:
the FFN drops padding before routing) and drop nothing, so their pictures have no "dropped" marks.
"""
from __future__ import annotations

import dataclasses
import re
from typing import TYPE_CHECKING, Any

from PIL import Image, ImageDraw, ImageFont

if TYPE_CHECKING:
    import torch

DROPPED = -1  # expert of a token dropped over capacity
PAD = -2  # padding (never routed with top-1)
DROPPED_RGB = (0, 0, 0)
PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
           (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195)]  # Sasha Trubetskoy's 16 distinct colours
CELL = 48  # pixels per patch side in a routing panel (at most; big grids get smaller cells)
PANEL = 224  # routing panel side at most
MARGIN = 12
TINT = 0.45  # weight of the expert colour over the image
TITLE_H = 40  # title band of a routing picture
TAG = "routing/sample_{}"  # TensorBoard tag of eval sample i's picture


def expert_rgb(expert: int) -> tuple[int, int, int]:
    """Palette colour of ``expert`` (cycles above 16 experts); black for a dropped token."""
    return DROPPED_RGB if expert == DROPPED else PALETTE[expert % len(PALETTE)]


# ------------------------------------------------------------------------------------------- routing
@dataclasses.dataclass
class MoECall:
    """One MoE FFN call of a forward pass: the joint-sequence span [start, end) it saw and, per token of it,
    the expert of its first route (``DROPPED``, ``PAD``) and the router's first choice."""

    layer: int
    key: str  # FFN key: a modality, "vl" or "shared"
    start: int
    end: int
    expert_bn: torch.Tensor  # [B, n] long
    wanted_bn: torch.Tensor  # [B, n] long
    dropless: bool = False  # a moe.impl dropless FFN: nothing is ever dropped

    @property
    def name(self) -> str:
        return f"layer{self.layer}/{self.key}"


def first_routes(output: tuple, wanted_s: torch.Tensor) -> torch.Tensor:
    """Expert of each token's first route [S] (``DROPPED`` where capacity dropped it) from a gate's output:
    the local gate's (indices [K, S], gates, counts), DeepSpeed's with sparse routes (l_aux, capacity, E,
    indices [K, S], ...) or DeepSpeed's dense one (l_aux, combine [S, E, C], dispatch mask [S, E, C], counts),
    where the router's choice ``wanted_s`` is kept iff the dispatch mask has a slot for it."""
    import torch

    if len(output) == 3:
        return output[0][0].long()
    if isinstance(output[1], torch.Tensor) and output[1].dim() == 3:
        kept_s = output[2].bool().any(2).gather(1, wanted_s[:, None])[:, 0]
        return torch.where(kept_s, wanted_s, torch.full_like(wanted_s, DROPPED))
    return output[3][0].long().clamp(min=DROPPED)


class RoutingRecorder:
    """Forward hooks on every MoE gate of a ``VLMoE`` (local or DeepSpeed experts; a dropless FFN's router),
    installed only during ``run``: it returns the ``MoECall`` of each gate call of one encoder pass."""

    def __init__(self, vlmoe: torch.nn.Module):
        self.vlmoe = vlmoe
        self.raw: list[tuple[int, str, torch.Tensor, torch.Tensor]] = []
        self.gates = {}
        self.dropless: dict[tuple[int, str], torch.nn.Module] = {}  # FFNs routed by ``router`` (moe.impl dropless)
        self._used: dict[tuple[int, str], torch.Tensor | None] = {}
        for name, ffn in vlmoe.sparse_ffns().items():
            match = re.fullmatch(r"blocks\.(\d+)\.ffn\.(\w+)", name)
            if match is None:
                raise ValueError(f"unexpected MoE FFN name {name!r} (expected blocks.<i>.ffn.<key>)")
            where = (int(match.group(1)), match.group(2))
            if hasattr(ffn, "deepspeed_moe"):
                self.gates[where] = ffn.deepspeed_moe.gate
            else:
                self.gates[where], self.dropless[where] = ffn.router, ffn

    def _hook(self, layer: int, key: str) -> Any:
        import torch.nn.functional as F

        def hook(gate: torch.nn.Module, args: tuple, output: tuple) -> None:
            wanted_s = F.linear(args[0].float(), gate.wg.weight.float()).argmax(1)
            self.raw.append((layer, key, first_routes(output, wanted_s).detach(), wanted_s))
        return hook

    def _dropless_hooks(self, layer: int, key: str) -> tuple[Any, Any]:
        """(pre-hook on the FFN: its ``used_s``; hook on its router: top-1 expert of the real tokens, scattered
        back over the call's S tokens with ``PAD`` for padding)."""
        import torch

        def ffn_pre_hook(ffn: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            used = args[1] if len(args) > 1 else kwargs.get("used_s")
            self._used[(layer, key)] = (args[0].shape[0], None if used is None else used.reshape(-1))

        def router_hook(router: torch.nn.Module, args: tuple, output: tuple) -> None:
            tokens, used_s = self._used[(layer, key)]
            first_t = output[1][:, 0].detach().long()
            expert_s = torch.full((tokens,), PAD, dtype=torch.long, device=first_t.device)
            if used_s is None:
                expert_s = first_t
            else:
                expert_s[used_s.nonzero().squeeze(1)] = first_t
            self.raw.append((layer, key, expert_s, expert_s))
        return ffn_pre_hook, router_hook

    def _install(self) -> list[Any]:
        handles = []
        for (layer, key), gate in self.gates.items():
            if (layer, key) in self.dropless:
                pre, post = self._dropless_hooks(layer, key)
                handles.append(self.dropless[layer, key].register_forward_pre_hook(pre, with_kwargs=True))
                handles.append(gate.register_forward_hook(post))
            else:
                handles.append(gate.register_forward_hook(self._hook(layer, key)))
        return handles

    def run(self, inputs: dict[str, tuple[Any, ...]]) -> tuple[list[MoECall], dict[str, tuple[int, int]]]:
        """(MoE calls in call order, modality -> span) of one pass over ``inputs`` (``VLMoE.encode``, no grad).
        Collective under expert parallelism (the MoE all-to-all): every rank runs it on same-shaped inputs.
        The pass runs without token merging (``model.token_merge``), so every image token is one patch: the
        blocks after a merge show the routing of the unmerged sequence."""
        import torch

        from pipeline.model.token_merge import merging_off

        self.raw = []
        handles = self._install()
        try:
            with torch.no_grad(), merging_off(self.vlmoe):
                out = self.vlmoe.encode(inputs)
        finally:
            for handle in handles:
                handle.remove()
        valid_bn = out.token_mask.cpu()
        calls = []
        for layer, key, expert_s, wanted_s in self.raw:
            start, end = out.spans[key] if key in out.spans else (0, valid_bn.shape[1])
            shape = (valid_bn.shape[0], end - start)
            expert_bn = torch.where(valid_bn[:, start:end], expert_s.cpu().view(shape), torch.full(shape, PAD))
            calls.append(MoECall(layer, key, start, end, expert_bn.long(), wanted_s.cpu().view(shape).long(),
                                 (layer, key) in self.dropless))
        return calls, dict(out.spans)


def split_call(call: MoECall, spans: dict[str, tuple[int, int]], modality: str, sample: int = 0
               ) -> list[int] | None:
    """Experts of ``sample``'s tokens of ``modality`` in ``call`` (None if the call did not see them)."""
    if modality not in spans:
        return None
    start, end = spans[modality]
    if start < call.start or end > call.end:
        return None
    return call.expert_bn[sample, start - call.start:end - call.start].tolist()


def tensor_image(pixels_3hw: torch.Tensor) -> Image.Image:
    """A normalised image tensor (``downstream_common.image_tensor``) back to the RGB image the model saw."""
    import torch

    from pipeline.model import PIXEL_MEAN, PIXEL_STD

    mean = torch.as_tensor(PIXEL_MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.as_tensor(PIXEL_STD, dtype=torch.float32).view(3, 1, 1)
    rgb = (pixels_3hw.detach().float().cpu() * std + mean).mul(255).round().clamp(0, 255).to(torch.uint8)
    return Image.fromarray(rgb.permute(1, 2, 0).numpy(), "RGB")


# ------------------------------------------------------------------------------------------ drawing
def font(size: int = 11) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def text_colour(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    return (0, 0, 0) if 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2] > 140 else (255, 255, 255)


def draw_patches(canvas: Image.Image, image: Image.Image, experts_p: list[int], grid: int, x: int, y: int,
                 cell: int) -> None:
    """The image at (x, y), grid*cell square, each patch tinted by its expert, a solid dot at its centre."""
    side = grid * cell
    base = image.convert("RGB").resize((side, side), Image.BICUBIC)
    tint = Image.new("RGB", (side, side))
    draw = ImageDraw.Draw(tint)
    for p, expert in enumerate(experts_p):
        row, col = divmod(p, grid)
        draw.rectangle([col * cell, row * cell, (col + 1) * cell - 1, (row + 1) * cell - 1],
                       fill=(128, 128, 128) if expert == DROPPED else expert_rgb(expert))
    panel = Image.blend(base, tint, TINT)
    draw = ImageDraw.Draw(panel)
    dot = max(2, cell // 6)
    for p, expert in enumerate(experts_p):
        row, col = divmod(p, grid)
        cx, cy = col * cell + cell // 2, row * cell + cell // 2
        draw.rectangle([cx - dot, cy - dot, cx + dot, cy + dot], fill=expert_rgb(expert), outline=(255, 255, 255))
        if grid <= 16:
            draw.line([col * cell, row * cell, (col + 1) * cell - 1, row * cell], fill=(255, 255, 255))
            draw.line([col * cell, row * cell, col * cell, (row + 1) * cell - 1], fill=(255, 255, 255))
    canvas.paste(panel, (x, y))


def flow_boxes(labels: list[str], width: int, fnt: ImageFont.ImageFont, height: int) -> list[tuple[int, int, int]]:
    """(x, y, w) of each label's box, left to right, wrapped at ``width``."""
    out, x, y = [], 0, 0
    for label in labels:
        w = int(fnt.getlength(label)) + 10
        if x and x + w > width:
            x, y = 0, y + height + 4
        out.append((x, y, w))
        x += w + 4
    return out


def panel_geometry(grid: int) -> tuple[int, int]:
    """(cell, column width) of a routing picture's panels for a ``grid`` x ``grid`` patch image."""
    cell = max(2, min(CELL, PANEL // grid))
    return cell, max(grid * cell, 240)


def draw_routing(image: Image.Image, calls: list[MoECall], spans: dict[str, tuple[int, int]], tokens: list[str],
                 grid: int, title: str, sample: int = 0) -> tuple[Image.Image, dict]:
    """The routing picture (module docstring) of ``sample`` of the pass, ``tokens`` its real text tokens, and
    its layout: per column its panel (x, y, cell) and the box (x, y, w, h) of every token (image CLS first)."""
    fnt, small = font(12), font(11)
    cell, col_w = panel_geometry(grid)
    side = grid * cell
    layers = sorted({c.layer for c in calls})
    box_h = 18
    columns = []
    for layer in layers:
        layer_calls = [c for c in calls if c.layer == layer]
        image_call = next(c for c in layer_calls if split_call(c, spans, "image") is not None)
        image_experts = split_call(image_call, spans, "image", sample)
        text_call = next((c for c in layer_calls if split_call(c, spans, "text") is not None), None)
        text_experts = split_call(text_call, spans, "text", sample)[:len(tokens)] if text_call else []
        labels = ["image CLS"] + [t if e != DROPPED else f"{t} (dropped)" for t, e in zip(tokens, text_experts)]
        columns.append({"layer": layer, "calls": layer_calls, "image": image_experts, "text": text_experts,
                        "labels": labels, "boxes": flow_boxes(labels, col_w, small, box_h)})
    head_h = 36
    legend_rows = max(len(c["calls"]) for c in columns) * 3 + 1  # title + entries (wrapped once)
    boxes_h = max(c["boxes"][-1][1] for c in columns) + box_h
    height = TITLE_H + head_h + side + 10 + boxes_h + 10 + legend_rows * 18 + MARGIN
    subtitle = "tint and centre dot: expert of the token" + (
        "; dropless: no token dropped" if all(c.dropless for c in calls) else "; black: dropped over capacity")
    width = max(MARGIN + len(columns) * (col_w + MARGIN),  # the title is never cut (one column is narrow)
                2 * MARGIN + int(max(fnt.getlength(title), small.getlength(subtitle))) + 1)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    draw.text((MARGIN, 6), title, fill=(0, 0, 0), font=fnt)
    draw.text((MARGIN, 22), subtitle, fill=(90, 90, 90), font=small)
    layout: dict[str, Any] = {"grid": grid, "cell": cell, "columns": []}
    for i, col in enumerate(columns):
        x0, y = MARGIN + i * (col_w + MARGIN), TITLE_H
        keys = " / ".join(f"{c.key} FFN" for c in col["calls"])
        draw.text((x0, y), f"MoE layer {col['layer']}", fill=(0, 0, 0), font=fnt)
        draw.text((x0, y + 16), keys, fill=(90, 90, 90), font=small)
        y += head_h
        draw_patches(canvas, image, col["image"][-grid * grid:], grid, x0, y, cell)  # after CLS, summary tokens
        entry = {"layer": col["layer"], "keys": [c.key for c in col["calls"]], "panel": [x0, y, cell], "boxes": []}
        y += side + 10
        experts = col["image"][:1] + col["text"]
        for label, (bx, by, bw), expert in zip(col["labels"], col["boxes"], experts):
            rgb = expert_rgb(expert)
            draw.rectangle([x0 + bx, y + by, x0 + bx + bw - 1, y + by + box_h - 1], fill=rgb, outline=(200, 200, 200))
            draw.text((x0 + bx + 5, y + by + 3), label, fill=text_colour(rgb), font=small)
            entry["boxes"].append([x0 + bx, y + by, bw, box_h])
        y += boxes_h + 10
        for call in col["calls"]:
            y = draw_legend(draw, call, x0, y, col_w, small, sample)
        layout["columns"].append(entry)
    return canvas, layout


def draw_legend(draw: ImageDraw.ImageDraw, call: MoECall, x0: int, y: int, width: int,
                fnt: ImageFont.ImageFont, sample: int = 0) -> int:
    """Under a column: the FFN, then a swatch and token count per expert (and dropped) of ``sample``, wrapped at
    ``width``; returns the y below."""
    experts = [e for e in call.expert_bn[sample].tolist() if e != PAD]
    draw.text((x0, y), f"{call.key} FFN experts (tokens):", fill=(0, 0, 0), font=fnt)
    y += 18
    x = x0
    used = sorted({e for e in experts if e >= 0}) + ([DROPPED] if DROPPED in experts else [])
    for expert in used:
        label = f"{'dropped' if expert == DROPPED else f'e{expert}'}: {experts.count(expert)}"
        w = 16 + int(fnt.getlength(label)) + 10
        if x > x0 and x + w > x0 + width:
            x, y = x0, y + 18
        draw.rectangle([x, y + 2, x + 11, y + 13], fill=expert_rgb(expert), outline=(120, 120, 120))
        draw.text((x + 15, y + 1), label, fill=(0, 0, 0), font=fnt)
        x += w
    return y + 18


def heat_rgb(share: float) -> tuple[int, int, int]:
    """White (0) -> dark blue (1)."""
    return tuple(int(round(w + (d - w) * share)) for w, d in zip((255, 255, 255), (8, 48, 107)))


def draw_stats(stats: dict) -> Image.Image:
    """Per MoE call one row: a heat map per modality (kinds x experts + dropped) and the load per expert
    (``stats``: ``pipeline.explain.routing_stats``)."""
    fnt, small = font(12), font(11)
    experts = stats["num_experts"]
    drops = not stats.get("dropless", False)  # a dropless model has no "dropped" column
    cell_w, cell_h, label_w, bar_h = 44, 20, 170, 90
    heat_w = label_w + (experts + drops) * cell_w
    rows = []
    for name, entry in stats["calls"].items():
        maps_h = sum(20 + cell_h * (len(k) + 1) + 8 for k in entry["kinds"].values())
        rows.append((name, entry, max(maps_h, bar_h + 60)))
    width = MARGIN + heat_w + 2 * MARGIN + max(220, experts * 28 + 40) + MARGIN
    height = 40 + sum(26 + h for *_, h in rows) + MARGIN
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    draw.text((MARGIN, 8), f"routing over {stats['samples']} samples: share of each kind of token per expert",
              fill=(0, 0, 0), font=fnt)
    y = 40
    for name, entry, h in rows:
        draw.text((MARGIN, y), f"{name} FFN ({entry['tokens']} tokens)", fill=(0, 0, 0), font=fnt)
        y += 26
        my = y
        for modality, kinds in entry["kinds"].items():
            draw.text((MARGIN, my), modality, fill=(90, 90, 90), font=small)
            heads = [f"e{e}" for e in range(experts)] + ["drop"] * drops
            for j, head in enumerate(heads):
                draw.text((MARGIN + label_w + j * cell_w + 10, my), head, fill=(0, 0, 0), font=small)
            my += 20
            for kind, cell in kinds.items():
                draw.text((MARGIN, my + 4), f"{kind} ({cell['tokens']})", fill=(0, 0, 0), font=small)
                for j, count in enumerate(cell["experts"] + [cell["dropped"]] * drops):
                    share = count / max(cell["tokens"], 1)
                    x = MARGIN + label_w + j * cell_w
                    draw.rectangle([x, my, x + cell_w - 2, my + cell_h - 2], fill=heat_rgb(share))
                    draw.text((x + 6, my + 4), f"{share:.0%}", fill=text_colour(heat_rgb(share)), font=small)
                my += cell_h
            my += cell_h + 8
        draw_load(draw, entry, MARGIN + heat_w + 2 * MARGIN, y, bar_h, small, drops)
        y += h
    return canvas


def draw_load(draw: ImageDraw.ImageDraw, entry: dict, x0: int, y0: int, bar_h: int, fnt: ImageFont.ImageFont,
              drops: bool = True) -> None:
    """Bar chart: share of the call's tokens kept by each expert, then dropped unless ``drops`` is False (the
    tallest bar full height)."""
    counts = entry["load"] + [entry["dropped"]] * drops
    total, highest = max(entry["tokens"], 1), max(max(counts), 1)
    draw.text((x0, y0), "load per expert (share of tokens)", fill=(0, 0, 0), font=fnt)
    base = y0 + 34 + bar_h  # room for the title and the tallest bar's label
    for j, count in enumerate(counts):
        x = x0 + j * 28
        top = base - int(round(bar_h * count / highest))
        dropped = drops and j == len(counts) - 1
        draw.rectangle([x, top, x + 20, base], fill=expert_rgb(DROPPED if dropped else j))
        draw.text((x + 2, base + 3), "dr" if dropped else f"e{j}", fill=(0, 0, 0), font=fnt)
        draw.text((x, top - 13), f"{count / total:.0%}", fill=(0, 0, 0), font=fnt)


# ------------------------------------------------------------------------------- training (TensorBoard)
def sample_pictures(vlmoe: torch.nn.Module, samples: list[dict[str, Any]], tokenizer: Any, device: torch.device,
                    title: str, draw: bool = True) -> list[Image.Image]:
    """Routing pictures of prepared samples (``pixel_values`` [3, H, W], optional ``input_ids`` /
    ``attention_mask`` [L]) run as ONE batch through ``vlmoe`` (collective under expert parallelism: call it
    on every rank with same-shaped samples). ``title`` is formatted with ``i``, then the text follows. ``draw`` False:
    the pass only (ranks other than the one that writes)."""
    import torch

    pixels_bchw = torch.stack([s["pixel_values"] for s in samples])
    inputs: dict[str, tuple[Any, ...]] = {"image": (pixels_bchw.to(device),)}
    with_text = tokenizer is not None and "text" in vlmoe.cfg.modalities and all(
        isinstance(s.get("input_ids"), torch.Tensor) and s["input_ids"].dim() == 1 for s in samples)
    if with_text:
        inputs["text"] = tuple(torch.stack([s[k] for s in samples]).long().to(device)
                               for k in ("input_ids", "attention_mask"))
    calls, spans = RoutingRecorder(vlmoe).run(inputs)
    if not draw:
        return []
    grid = pixels_bchw.shape[-1] // vlmoe.cfg.patch_size
    pictures = []
    for i, sample in enumerate(samples):
        tokens, text = [], ""
        if with_text:
            ids = sample["input_ids"][:int(sample["attention_mask"].sum())].tolist()
            tokens, text = tokenizer.convert_ids_to_tokens(ids), tokenizer.decode(ids, skip_special_tokens=True)
        picture, _ = draw_routing(tensor_image(sample["pixel_values"]), calls, spans, tokens, grid,
                                  title.format(i=i) + (f": {text[:80]!r}" if text else ""), sample=i)
        pictures.append(picture)
    return pictures


def first_eval_samples(recipe: Any, task: Any, count: int) -> list[dict[str, Any]]:
    """The first ``count`` prepared samples of ``data.eval`` (shards in order, no worker): the same ones at
    every evaluation and on every rank; only those with one image."""
    import torch

    from pipeline.data.loader import build_eval_loader

    data_cfg = dataclasses.replace(recipe.data, num_workers=0)
    for item in build_eval_loader(recipe.data.eval, data_cfg, task, count, 0, 1):
        if isinstance(item, list):
            return [s for s in item if isinstance(s.get("pixel_values"), torch.Tensor)
                    and s["pixel_values"].dim() == 3]
    return []


def log_routing_images(module: Any, task: Any, recipe: Any, dist: Any, sink: Any, step: int) -> int:
    """Collective (every rank, at each evaluation): TensorBoard images ``routing/sample_<i>`` of the first
    ``train.routing_images`` eval samples with an image, one eval-mode batch through the task's model on every
    rank (the MoE all-to-all needs all of them), drawn and written by rank 0 (``sink``). Returns the number of
    pictures (0: off, no image input, no MoE layer or no eval data)."""
    from pipeline.run.distributed import all_reduce_max

    vlmoe = getattr(module, "model", None)
    count = recipe.train.routing_images
    if (count <= 0 or recipe.data.eval is None or vlmoe is None or "image" not in vlmoe.cfg.modalities
            or not vlmoe.sparse_ffns()):
        return 0
    samples = first_eval_samples(recipe, task, count)
    count = int(-all_reduce_max(-float(len(samples)), dist.device))  # the fewest any rank read
    if count == 0:
        return 0
    was_training = module.training
    module.eval()
    try:
        pictures = sample_pictures(vlmoe, samples[:count], getattr(task.ctx, "tokenizer", None), dist.device,
                                   f"step {step}, eval sample {{i}}", draw=dist.is_main)
    finally:
        module.train(was_training)
    for i, picture in enumerate(pictures):
        sink.image(TAG.format(i), picture, step)
    return count
