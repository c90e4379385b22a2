"""VLMo/VL-MoE pretraining objectives: ITC, ITM with hard negatives, MLM; the same three for audio-text
pairs (ATC, ATM, MLM with audio context): "image" below stands for the batch's media modality.

Shapes: B local batch, W data-parallel world size, G = B*W global batch, P projection dim, L text length,
D hidden, V vocab, M masked tokens.

- ITC: InfoNCE both ways between local features and the features of the whole DP group, gathered WITH
  gradient (``torch.distributed.nn.functional.all_gather``), learnable temperature from ``ITCHead``.
- ITM: for each image a negative text, for each text a negative image, sampled from the global batch with
  probability softmax(ITC similarity) (the positive excluded); 3B fused pairs, label 1 for the B positives.
- MLM: BERT masking (15%, of which 80% [MASK], 10% random token, 10% kept) never touching special or
  padding tokens; loss over masked positions through the tied decoder.
- CAP (CoCa-style captioning, ``CAPTION_OBJECTIVES``): next-token loss on "[CLS] caption [SEP]" with the media
  as bidirectional prefix and causal text, through the same tied decoder (``pipeline.objectives.captioning``).
Every function takes the DP ``group`` explicitly (None = default group; not initialised = single process).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.nn.functional import all_gather as all_gather_with_grad

from pipeline.objectives.captioning import lm_loss

IGNORE = -100


def _world(group: Any) -> tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def gather_with_grad(x: torch.Tensor, group: Any = None) -> torch.Tensor:
    """[B, ...] on every rank -> [W*B, ...] in rank order; gradients flow back to each rank's slice."""
    if _world(group)[1] == 1:
        return x
    return torch.cat(all_gather_with_grad(x.contiguous(), group=group), dim=0)


@torch.no_grad()
def gather_no_grad(x: torch.Tensor, group: Any = None) -> torch.Tensor:
    """[B, ...] -> [W*B, ...] without gradient (inputs for ITM negatives)."""
    world = _world(group)[1]
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=0)


@dataclasses.dataclass
class ITCResult:
    loss: torch.Tensor  # scalar: (image->text CE + text->image CE) / 2
    sim_i2t: torch.Tensor  # [B, G] detached scaled similarities, local images vs all texts
    sim_t2i: torch.Tensor  # [B, G] local texts vs all images
    accuracy: torch.Tensor  # scalar: mean of i2t and t2i top-1 accuracy on the global batch


def itc_loss(image_bp: torch.Tensor, text_bp: torch.Tensor, logit_scale: torch.Tensor,
             group: Any = None) -> ITCResult:
    """Contrastive loss with global negatives. Features must be L2-normalised (ITCHead does it)."""
    rank, _ = _world(group)
    images_gp, texts_gp = gather_with_grad(image_bp, group), gather_with_grad(text_bp, group)
    logits_i2t = logit_scale * image_bp @ texts_gp.t()
    logits_t2i = logit_scale * text_bp @ images_gp.t()
    targets = torch.arange(image_bp.shape[0], device=image_bp.device) + rank * image_bp.shape[0]
    loss = (F.cross_entropy(logits_i2t, targets) + F.cross_entropy(logits_t2i, targets)) / 2
    with torch.no_grad():
        acc = ((logits_i2t.argmax(-1) == targets).float().mean()
               + (logits_t2i.argmax(-1) == targets).float().mean()) / 2
    return ITCResult(loss, logits_i2t.detach(), logits_t2i.detach(), acc)


@torch.no_grad()
def sample_hard_negatives(sim_i2t: torch.Tensor, sim_t2i: torch.Tensor, rank: int = 0,
                          generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Global indices (into the gathered batch) of a negative text per local image and a negative image
    per local text, drawn with probability softmax(similarity) over all non-positive pairs."""
    b, g = sim_i2t.shape
    if g < 2:
        raise ValueError("ITM hard negatives need a global batch of at least 2 samples")
    rows = torch.arange(b, device=sim_i2t.device)
    positives = rows + rank * b
    picks = []
    for sim in (sim_i2t, sim_t2i):
        weights = torch.softmax(sim.float(), dim=1) + 1e-12  # collapsed rows stay samplable
        weights[rows, positives] = 0
        picks.append(torch.multinomial(weights, 1, generator=generator).squeeze(1))
    return picks[0], picks[1]


#: the batch keys of each media modality's model inputs, in ``VLMoE.encode`` argument order
MEDIA_KEYS = {"image": ("pixel_values",), "audio": ("audio_values", "audio_lengths")}
#: the objective (and head) names of the media-text pair objectives, per media modality: contrastive,
#: matching, MLM with the media as context. Image: VLMo's ITC / ITM / MLM; audio: ATC / ATM / audio MLM
#: (the MLM head, tied to the token embeddings, is shared: "mlm").
PAIR_OBJECTIVES = {"image": ("itc", "itm", "mlm"), "audio": ("atc", "atm", "audio_mlm")}
#: the captioning objective per media modality (CoCa-style, next to the pair objectives): the prefix-LM loss
#: ``pipeline.objectives.captioning.lm_loss`` on media + "[CLS] caption [SEP]" through the shared mlm head
CAPTION_OBJECTIVES = {"image": "cap", "audio": "audio_cap"}


def batch_media(batch: dict[str, Any]) -> str:
    """The media modality of a media-text batch: "audio" when it holds ``audio_values``, else "image"."""
    return "audio" if "audio_values" in batch else "image"


def media_inputs(batch: dict[str, Any], media: str) -> tuple[torch.Tensor, ...]:
    return tuple(batch[key] for key in MEDIA_KEYS[media])


def encode_pair(model: torch.nn.Module, media: str, inputs: tuple[torch.Tensor, ...], input_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> Any:
    """One fused pass over a media modality and text (``model.fuse`` for images)."""
    return model.encode({media: inputs, "text": (input_ids, attention_mask)})


def itm_batch(media: tuple[torch.Tensor, ...], input_ids: torch.Tensor, attention_mask: torch.Tensor,
              itc: ITCResult, group: Any = None, generator: torch.Generator | None = None
              ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor, torch.Tensor, torch.Tensor]:
    """(media inputs [3B,...], ids [3B,L], mask [3B,L], labels [3B]): positives, (media, hard negative text),
    (hard negative media, text). ``media``: the media modality's inputs (images: (pixels,); audio:
    (log-mel, lengths)). Shapes are fixed (3B) on every rank."""
    rank, _ = _world(group)
    neg_text_idx, neg_media_idx = sample_hard_negatives(itc.sim_i2t, itc.sim_t2i, rank, generator)
    all_ids, all_mask = gather_no_grad(input_ids, group), gather_no_grad(attention_mask, group)
    mixed = tuple(torch.cat([x, x, gather_no_grad(x, group)[neg_media_idx]]) for x in media)
    ids = torch.cat([input_ids, all_ids[neg_text_idx], input_ids])
    mask = torch.cat([attention_mask, all_mask[neg_text_idx], attention_mask])
    b = input_ids.shape[0]
    labels = torch.cat([torch.ones(b, dtype=torch.long), torch.zeros(2 * b, dtype=torch.long)])
    return mixed, ids, mask, labels.to(input_ids.device)


def itm_loss(logits_b2: torch.Tensor, labels_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cross-entropy, accuracy)."""
    acc = (logits_b2.argmax(-1) == labels_b).float().mean().detach()
    return F.cross_entropy(logits_b2.float(), labels_b), acc


@torch.no_grad()
def mask_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor, special_ids: list[int] | torch.Tensor,
                mask_id: int, vocab_size: int, prob: float = 0.15,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking -> (masked ids [B,L], labels [B,L] with IGNORE where not predicted).

    Only real (attention_mask=1), non-special tokens are candidates; each with ``prob``; of those 80%
    become ``mask_id``, 10% a random non-special token, 10% stay."""
    device = input_ids.device
    special = torch.as_tensor(special_ids, dtype=input_ids.dtype, device=device)
    candidates = attention_mask.bool() & ~torch.isin(input_ids, special)

    def draw(shape: torch.Size) -> torch.Tensor:
        return torch.rand(shape, generator=generator, device=device)

    chosen = candidates & (draw(input_ids.shape) < prob)
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE))
    replace = chosen & (draw(input_ids.shape) < 0.8)
    randomise = chosen & ~replace & (draw(input_ids.shape) < 0.5)
    masked = torch.where(replace, torch.full_like(input_ids, mask_id), input_ids)
    allowed = torch.ones(vocab_size, dtype=torch.bool, device=device)
    allowed[special[special < vocab_size]] = False
    pool = allowed.nonzero().squeeze(1)
    random_ids = pool[torch.randint(len(pool), input_ids.shape, generator=generator, device=device)]
    masked = torch.where(randomise, random_ids.to(input_ids.dtype), masked)
    return masked, labels


def mlm_loss(mlm_head: torch.nn.Module, text_hidden_bld: torch.Tensor, labels_bl: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean CE over masked positions, accuracy); 0 (with a graph) when nothing is masked."""
    selected = labels_bl != IGNORE
    targets_m = labels_bl[selected]
    logits_mv = mlm_head(text_hidden_bld[selected]).float()
    count = targets_m.numel()
    loss = F.cross_entropy(logits_mv, targets_m, reduction="sum") / max(count, 1)
    acc = ((logits_mv.argmax(-1) == targets_m).float().sum() / max(count, 1)).detach()
    return loss, acc


def vl_pretrain_losses(model: torch.nn.Module, heads: torch.nn.ModuleDict, batch: dict[str, torch.Tensor],
                       weights: dict[str, float], group: Any = None,
                       generator: torch.Generator | None = None) -> dict[str, Any]:
    """One VLMo pretraining micro-step on a media-text batch (images or audio: ``batch_media``).

    ``batch``: the media inputs (``MEDIA_KEYS``), input_ids, attention_mask and, for MLM, mlm_input_ids /
    mlm_labels (from ``mask_tokens``). ``weights`` and ``heads`` use the media's ``PAIR_OBJECTIVES`` names
    (image: itc, itm, mlm; audio: atc, atm, audio_mlm, with heads atc, atm and the shared mlm head) and its
    ``CAPTION_OBJECTIVES`` name (cap, audio_cap: the LM loss through the mlm head); weights of the other
    media's objectives are ignored.

    Returns {"loss": weighted sum (the MoE aux loss is the model's own record), "terms": {name: detached}}.
    Model calls per step (same on every rank for the same media): encode the media (B) and the text (B) for
    the contrastive loss; fuse(3B) for matching; fuse(B) for MLM; fuse(B) with causal text for captioning."""
    media = batch_media(batch)
    c_name, m_name, mlm_name = PAIR_OBJECTIVES[media]
    inputs, ids, mask = media_inputs(batch, media), batch["input_ids"], batch["attention_mask"]
    terms: dict[str, torch.Tensor] = {}
    loss = ids.new_zeros((), dtype=torch.float32)
    itc = None
    if weights.get(c_name, 0) or weights.get(m_name, 0):
        media_out, text_out = model.encode({media: inputs}), model.encode_text(ids, mask)
        itc = itc_loss(*heads[c_name](media_out.pooled, text_out.pooled), group=group)
        terms.update({c_name: itc.loss.detach(), f"{c_name}_acc": itc.accuracy})
        if weights.get(c_name, 0):
            loss = loss + weights[c_name] * itc.loss
    if weights.get(m_name, 0):
        assert itc is not None
        pair_media, pair_ids, pair_mask, labels = itm_batch(inputs, ids, mask, itc, group, generator)
        fused = encode_pair(model, media, pair_media, pair_ids, pair_mask)
        term, acc = itm_loss(heads[m_name](fused.pooled), labels)
        loss = loss + weights[m_name] * term
        terms.update({m_name: term.detach(), f"{m_name}_acc": acc})
    if weights.get(mlm_name, 0):
        fused = encode_pair(model, media, inputs, batch["mlm_input_ids"], mask)
        start, end = fused.spans["text"]
        term, acc = mlm_loss(heads["mlm"], fused.hidden[:, start:end], batch["mlm_labels"])
        loss = loss + weights[mlm_name] * term
        terms.update({mlm_name: term.detach(), f"{mlm_name}_acc": acc})
    cap_name = CAPTION_OBJECTIVES[media]
    if weights.get(cap_name, 0):
        term, acc = lm_loss(model, heads["mlm"], {media: inputs}, ids, mask)
        loss = loss + weights[cap_name] * term
        terms.update({cap_name: term.detach(), f"{cap_name}_acc": acc})
    return {"loss": loss, "terms": terms}
