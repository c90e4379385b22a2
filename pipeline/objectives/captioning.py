"""The captioning / answer-generation objective: next-token prediction of a prefix-LM pass.

Shapes: B batch, L text length, D hidden, V vocab.

The media tokens (image and/or audio) are bidirectional context, the text is causal
(``VLMoE.encode(..., causal=True)``; optionally after a bidirectional text prefix such as a question),
and the LM head (the tied MLM head) predicts token t+1 from the hidden
state of token t: the same model, head and masks ``pipeline.model.generation.generate`` decodes with.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def lm_loss(model: torch.nn.Module, lm_head: torch.nn.Module, media: dict[str, tuple[Any, ...]],
            input_ids_bl: torch.Tensor, attention_mask_bl: torch.Tensor, loss_mask_bl: torch.Tensor | None = None,
            text_prefix_b: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean cross-entropy over the predicted tokens, token accuracy (detached)).

    ``media``: modality -> embedding args as ``model.encode`` takes them ({"image": (pixels,)}, {"audio":
    (log-mel, lengths)}, or {} for text only). ``text_prefix_b`` [B]: the first P_b text tokens form a
    bidirectional prefix (e.g. "[CLS] question [SEP]"); the rest is causal. See ``lm_loss_of`` for which
    tokens are predicted."""
    out = model.encode({**media, "text": (input_ids_bl, attention_mask_bl)}, causal=True, text_prefix=text_prefix_b)
    return lm_loss_of(out, lm_head, input_ids_bl, attention_mask_bl, loss_mask_bl)


def lm_loss_of(out: Any, lm_head: torch.nn.Module, input_ids_bl: torch.Tensor, attention_mask_bl: torch.Tensor,
               loss_mask_bl: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``lm_loss`` from an encoder output already computed (a pass whose other outputs feed other heads).

    Token t+1 is predicted where ``attention_mask[t+1]`` is set (and ``loss_mask[t+1]`` when given: e.g. only
    the answer of "[CLS] question [SEP] answer [SEP]"); the first token (BOS) is never predicted. A batch with
    no predicted token gives a 0 loss that keeps the graph."""
    start, end = out.spans["text"]
    predicted_bl = attention_mask_bl[:, 1:].bool()
    if loss_mask_bl is not None:
        predicted_bl = predicted_bl & loss_mask_bl[:, 1:].bool()
    hidden_md = out.hidden[:, start:end - 1][predicted_bl]
    targets_m = input_ids_bl[:, 1:][predicted_bl]
    logits_mv = lm_head(hidden_md).float()
    if targets_m.numel() == 0:
        zero = logits_mv.sum() * 0.0
        return zero, zero.detach()
    loss = F.cross_entropy(logits_mv, targets_m)
    accuracy = (logits_mv.argmax(-1) == targets_m).float().mean().detach()
    return loss, accuracy
