"""Initialisation from pretrained weights: HF ViT (VLMo-style), BERT token embeddings, sparse upcycling.

    model = VLMoE(cfg)                                    # from-scratch init first (routers stay fresh)
    init_from_vit(model, "path/to/vit")                   # a transformers.ViTModel save_pretrained folder
    init_text_embeddings(model, "path/to/bert")           # optional, vocab must match
    load_upcycled(model, dense_state_dict)                # any dense VLMoE state dict -> this (MoE) model

Recipes reach these through ``init:`` (pipeline.model.init_recipe: checks before launch, apply at build).

Upcycling (arXiv 2212.05055): every expert of an MoE FFN starts as a copy of the dense FFN it replaces
(residual MoE: its dense branch too; a dropless FFN's fused experts ``experts.w1[e] = fc1.weight``,
``w2[e] = fc2.weight``, ``w3[e, 0] = cat(fc1.bias, fc2.bias)``, its shared experts as the dense branch);
routers, residual coefficients and the dropless expert bias keep their fresh init, and so do summary tokens
(``model.summary_tokens``) the source lacks. FFNs with no
dense source of their own (text / vl / shared from a ViT) copy the first modality's FFN (image).
With ``upcycle=False`` the experts keep their from-scratch init (each drawn independently) instead.
Image position embeddings of another grid are interpolated (bicubic); anything else that does not fit
raises ``PretrainedMismatch`` naming every offending weight.

BERT is post-LN (LayerNorm after each residual sum, and after the embeddings), our blocks are pre-LN, so
no BERT block computes what one of ours does: only the text embeddings are taken. What matches exactly is
the residual stream entering the first block: word + position + token-type-0 embeddings (BERT's sum before
its embedding LayerNorm; token type 0 becomes our text modality-type embedding).
"""
from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

import torch
from torch import nn

from pipeline.model.embeddings import resize_positions

logger = logging.getLogger(__name__)

_VIT_BLOCK = {  # on-disk ViTModel names (also written by transformers 5) -> ours, per block
    "layernorm_before": "norm1", "layernorm_after": "norm2", "attention.output.dense": "attn.proj",
    "intermediate.dense": "ffn.image.fc1", "output.dense": "ffn.image.fc2"}
_VIT_TOP = {"embeddings.cls_token": "embeddings.image.cls",
            "embeddings.position_embeddings": "embeddings.image.position",
            "embeddings.patch_embeddings.projection.weight": "embeddings.image.patch.weight",
            "embeddings.patch_embeddings.projection.bias": "embeddings.image.patch.bias",
            "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias"}
_FFN_PARAM = re.compile(r"^blocks\.(\d+)\.ffn\.([a-z_]+)\.(.+)$")
_FRESH = re.compile(r"(deepspeed_moe\.gate\.wg\.|\.coefficient\.|\.router\.gate\.|\.expert_bias$)")  # routers
_EXPERT = re.compile(r"\.deepspeed_moe\.experts\.|\.experts\.w[123]$")  # gshard or dropless experts
_SUMMARY = re.compile(r"^summary\.\w+$")  # model.summary_tokens: new when the source has none
_FUSED = re.compile(r"^(blocks\.\d+\.ffn\.[a-z_]+)\.experts\.(w[123])$")  # dropless: [E_l, ...] per FFN
_VIT_HEADS = ("pooler.", "classifier.")  # ViTModel pooler, ViTForImageClassification head: not the encoder


class PretrainedMismatch(ValueError):
    """Pretrained weights that do not fit the model (missing, unexpected or wrong shape)."""


def read_state_dict(folder: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a HF model folder (model.safetensors, sharded safetensors, or pytorch_model.bin)."""
    folder = Path(folder)
    from safetensors.torch import load_file
    if (folder / "model.safetensors").exists():
        return load_file(folder / "model.safetensors")
    index = folder / "model.safetensors.index.json"
    if index.exists():
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            state.update(load_file(folder / shard))
        return state
    if (folder / "pytorch_model.bin").exists():
        return torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{folder}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def vit_to_dense_state(vit_state: dict[str, torch.Tensor]
                       ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """ViTModel tensors -> our dense layout (FFN under ``ffn.image``); also the ViT keys left unused."""
    vit_state = {k.removeprefix("vit."): v for k, v in vit_state.items()}
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for src, dst in _VIT_TOP.items():
        if src in vit_state:
            out[dst] = vit_state[src]
            used.add(src)
    layers = sorted({int(m.group(1)) for k in vit_state if (m := re.match(r"encoder\.layer\.(\d+)\.", k))})
    for i in layers:
        pre = f"encoder.layer.{i}."
        for kind in ("weight", "bias"):
            for src, dst in _VIT_BLOCK.items():
                if pre + f"{src}.{kind}" in vit_state:
                    out[f"blocks.{i}.{dst}.{kind}"] = vit_state[pre + f"{src}.{kind}"]
                    used.add(pre + f"{src}.{kind}")
            qkv = [pre + f"attention.attention.{p}.{kind}" for p in ("query", "key", "value")]
            if all(k in vit_state for k in qkv):
                out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([vit_state[k] for k in qkv])
                used.update(qkv)
    unused = sorted(k for k in set(vit_state) - used if not k.startswith(_VIT_HEADS))
    return out, unused


def _source_key(key: str, dense: dict[str, torch.Tensor], fallback_ffn: str) -> str | None:
    """Dense-state key that model parameter ``key`` is copied from (None = keep fresh init)."""
    if _FRESH.search(key):
        return None
    match = _FFN_PARAM.match(key)
    if not match:
        return key
    layer, ffn, rest = match.groups()
    param = re.sub(r"^(deepspeed_moe\.experts\.deepspeed_experts\.\d+\.|mlp\.|shared\.)", "", rest)
    own = f"blocks.{layer}.ffn.{ffn}.{param}"
    return own if own in dense else f"blocks.{layer}.ffn.{fallback_ffn}.{param}"


def _fused_sources(key: str, dense: dict[str, torch.Tensor], fallback_ffn: str) -> list[str] | None:
    """Dense-state keys a dropless FFN's fused expert tensor ``key`` is built from (None: not such a key):
    fc1.weight (w1), fc2.weight (w2), fc1.bias + fc2.bias (w3)."""
    match = _FUSED.match(key)
    if match is None:
        return None
    layer = match.group(1).split(".")[1]
    params = {"w1": ["fc1.weight"], "w2": ["fc2.weight"], "w3": ["fc1.bias", "fc2.bias"]}[match.group(2)]
    return [_source_key(f"blocks.{layer}.ffn.{match.group(1).rsplit('.', 1)[1]}.{param}", dense, fallback_ffn)
            for param in params]


@torch.no_grad()
def load_upcycled(model: nn.Module, dense: dict[str, torch.Tensor], keep_fresh: tuple[str, ...] = (),
                  unexpected: list[str] | None = None, upcycle: bool = True) -> list[str]:
    """Copy ``dense`` into ``model``, replicating each dense FFN into every expert that replaces it
    (``upcycle=False``: experts keep their init, the dense FFNs they replace go unused).

    ``keep_fresh``: key prefixes that may be absent from ``dense`` (they keep their init). Returns the
    model keys left at their fresh init. Raises PretrainedMismatch listing every problem."""
    fallback = model.cfg.modalities[0]
    problems = [f"unexpected: {k}" for k in unexpected or []]
    fresh, consumed = [], set()
    for key, param in model.state_dict().items():
        sources = _fused_sources(key, dense, fallback)
        if sources is not None:  # dropless: every local expert a copy of the dense FFN
            if upcycle:
                problems += _copy_fused(param, sources, dense, key)
            else:
                fresh.append(key)
            consumed.update(sources)
            continue
        src = _source_key(key, dense, fallback)
        if not upcycle and _EXPERT.search(key):  # the dense FFN it would copy counts as used
            fresh.append(key)
            consumed.add(src)
            continue
        if src is None or (src not in dense and (key.startswith(keep_fresh) or _SUMMARY.match(key))):
            fresh.append(key)
            continue
        if src not in dense:
            problems.append(f"missing: {key} (expected source {src})")
        elif key == "embeddings.image.position" and dense[src].shape[::2] == param.shape[::2]:
            param.copy_(resize_positions(dense[src], math.isqrt(param.shape[1] - 1)).to(param.dtype))
            consumed.add(src)
        elif dense[src].shape != param.shape:
            problems.append(f"shape: {key} {list(param.shape)} <- {src} {list(dense[src].shape)}")
        else:
            param.copy_(dense[src].to(param.dtype))
            consumed.add(src)
    problems += [f"unexpected: {k}" for k in sorted(set(dense) - consumed)]
    if problems:
        raise PretrainedMismatch("pretrained weights do not fit the model:\n  " + "\n  ".join(problems))
    return fresh


def _copy_fused(param: torch.Tensor, sources: list[str], dense: dict[str, torch.Tensor], key: str) -> list[str]:
    """Fill every expert row of fused tensor ``param`` [E_l, ...] from the dense tensors ``sources`` (w3: the
    two biases concatenated); the problems found, one line each (nothing copied then)."""
    missing = [src for src in sources if src not in dense]
    if missing:
        return [f"missing: {key} (expected source {', '.join(missing)})"]
    value = torch.cat([dense[src] for src in sources])[None] if len(sources) > 1 else dense[sources[0]]
    if value.shape != param.shape[1:]:
        shapes = " + ".join(f"{src} {list(dense[src].shape)}" for src in sources)
        return [f"shape: {key} {list(param.shape)} (one expert {list(param.shape[1:])}) <- {shapes}"]
    param.copy_(value.to(param.dtype).expand_as(param))
    return []


def vit_config_problems(cfg, vit_cfg: dict) -> list[str]:
    """Fields of a ViT ``config.json`` that do not fit model config ``cfg`` (one line each)."""
    expect = {"hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers,
              "num_attention_heads": cfg.num_heads, "intermediate_size": cfg.ffn_size,
              "patch_size": cfg.patch_size, "num_channels": cfg.num_channels, "hidden_act": "gelu",
              "qkv_bias": True}
    names = {"num_hidden_layers": "num_layers", "num_attention_heads": "num_heads",
             "intermediate_size": "ffn_size = hidden_size x mlp_ratio"}
    return [f"{k}={vit_cfg.get(k)!r} (model.{names.get(k, k)} needs {v!r})" for k, v in expect.items()
            if k in vit_cfg and vit_cfg[k] != v]


def vit_model_problems(cfg) -> list[str]:
    """Model settings a ViT checkpoint cannot initialise."""
    problems = []
    if cfg.coord_channels:
        problems.append("model.coord_channels=true: a ViT checkpoint's patch projection reads 3 pixel channels, "
                        "not pixels + 2 coordinate planes; set coord_channels: false")
    if cfg.qk_norm:
        problems.append("model.qk_norm=true: a ViT checkpoint has no query/key LayerNorms and its attention was "
                        "trained without them; set qk_norm: false")
    if cfg.patch_embed != "linear":
        problems.append(f"model.patch_embed={cfg.patch_embed!r}: a ViT checkpoint has a single linear patch "
                        "projection; initialise from a ViT with patch_embed: linear")
    if "image" not in cfg.modalities:
        problems.append(f"model.modalities={cfg.modalities}: a ViT initialises the image modality; add 'image'")
    return problems


@torch.no_grad()
def init_from_vit(model: nn.Module, folder: str | Path, upcycle: bool = True) -> list[str]:
    """VLMo-style init from a ``transformers.ViTModel`` folder: image embeddings, shared attention, norms and
    image FFNs; text/audio/VL FFNs start as copies of the image FFNs; MoE FFNs are sparse-upcycled (or keep
    their init with ``upcycle=False``). The modality-type embeddings are zeroed (ViT has none), so
    image-only outputs of a dense or upcycled model match ViT exactly.
    Returns the keys left at fresh init (text and audio embeddings, routers)."""
    folder = Path(folder)
    problems = vit_model_problems(model.cfg)
    if (folder / "config.json").exists():
        vit_cfg = json.loads((folder / "config.json").read_text())
        problems += vit_config_problems(model.cfg, vit_cfg)
        if abs(vit_cfg.get("layer_norm_eps", model.cfg.layer_norm_eps) - model.cfg.layer_norm_eps) > 1e-15:
            logger.warning("ViT layer_norm_eps=%s differs from model layer_norm_eps=%s",
                           vit_cfg.get("layer_norm_eps"), model.cfg.layer_norm_eps)
    if problems:
        raise PretrainedMismatch(f"ViT {folder} does not fit the model: " + "; ".join(problems))
    dense, unused = vit_to_dense_state(read_state_dict(folder))
    fresh = load_upcycled(model, dense, keep_fresh=("embeddings.text.", "embeddings.audio.", "modality_type."),
                          unexpected=unused, upcycle=upcycle)
    model.modality_type.weight.zero_()
    logger.info("initialised from ViT %s (upcycle=%s); fresh: %d tensors", folder, upcycle, len(fresh))
    return fresh


@torch.no_grad()
def init_text_embeddings(model: nn.Module, folder: str | Path, vocab_size: int | None = None) -> None:
    """Token and position embeddings from a BERT folder (vocabularies must match exactly); its token-type-0
    embedding becomes the text modality-type embedding. See the module docstring for what then matches."""
    state = {k.split("embeddings.", 1)[1]: v for k, v in read_state_dict(folder).items() if "embeddings." in k}
    words, positions = state.get("word_embeddings.weight"), state.get("position_embeddings.weight")
    types = state.get("token_type_embeddings.weight")
    emb = model.embeddings["text"]
    if words is None or positions is None:
        raise PretrainedMismatch(f"{folder}: no embeddings.word_embeddings.weight / position_embeddings.weight")
    if words.shape != emb.token.weight.shape or (vocab_size is not None and words.shape[0] != vocab_size):
        raise PretrainedMismatch(f"{folder}: word embeddings {list(words.shape)} do not fit the model's "
                                 f"{list(emb.token.weight.shape)} (tokenizer vocab {vocab_size})")
    if positions.shape[1] != emb.position.weight.shape[1] or positions.shape[0] < emb.position.weight.shape[0]:
        raise PretrainedMismatch(f"{folder}: position embeddings {list(positions.shape)} do not cover the "
                                 f"model's {list(emb.position.weight.shape)} (max_text_len x hidden_size)")
    emb.token.weight.copy_(words)
    emb.position.weight.copy_(positions[: emb.position.weight.shape[0]])
    if types is not None:
        model.modality_type.weight[model.cfg.modalities.index("text")] = types[0]
    logger.info("text embeddings from %s", folder)
