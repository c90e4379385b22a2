"""VL-MoE: the multiway transformer (VLMo) with sparse per-modality MoE FFNs (arXiv 2303.07226).

Shapes: B batch, N joint tokens, D hidden, E experts, C/H/W image, L text length, T/F log-mel frames/bands.

    model = VLMoE(ModelConfig())                 # demo size: 192 wide, 6 blocks, 4 experts every 2nd
    out = model.encode_image(pixels_bchw)        # image tower only
    out = model.encode_text(ids_bl, mask_bl)     # text tower only (causal=True for generation)
    out = model.fuse(pixels_bchw, ids_bl, mask_bl)  # joint sequence: image tokens, then text tokens
    out = model.encode_audio(logmel_btf, lengths_b)  # with "audio" in cfg.modalities (features: audio_features)
    model.moe_stats.reset(); ...passes...; aux = model.moe_stats.aux_loss()   # MoE aux loss, routed/kept counts

The generic entry is ``encode({modality: inputs})``; modalities are encoded in ``cfg.modalities`` order.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch
from torch import nn

from pipeline.model.blocks import Block, LayerKV, Segment, attention_mask, valid_tokens
from pipeline.model.sparse_attention import attention_layouts
from pipeline.model.config import GRID_MODALITIES, ModelConfig
from pipeline.model.embeddings import EMBEDDINGS
from pipeline.model.dropless import draw_experts
from pipeline.model.moe import MoEFFN, SparseFFN, expert_parallel_rank
from pipeline.model.moe_stats import MoEStats
from pipeline.model.token_merge import MergedKeys, merge_after_block


def _init_module(module: nn.Module, std: float) -> None:
    if isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding)):
        nn.init.trunc_normal_(module.weight, std=std, a=-2 * std, b=2 * std)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def masked_mean(hidden_bnd: torch.Tensor, mask_bn: torch.Tensor, size_bn: torch.Tensor | None = None
                ) -> torch.Tensor:
    """Mean over the tokens where ``mask_bn`` is True: [B, N, D] -> [B, D]; ``size_bn``: each token weighs as
    the patches it holds (token merging)."""
    weights_bn1 = mask_bn.to(hidden_bnd.dtype)[..., None]
    if size_bn is not None:
        weights_bn1 = weights_bn1 * size_bn.to(hidden_bnd.dtype)[..., None]
    return (hidden_bnd * weights_bn1).sum(1) / weights_bn1.sum(1).clamp(min=1)


@dataclasses.dataclass
class EncoderOutput:
    hidden: torch.Tensor  # [B, N, D] final (normed) hidden states, modalities in cfg order
    cls: torch.Tensor  # [B, D] first token: the CLS of the first modality present (cfg.modalities order)
    num_image_tokens: int  # image tokens in ``hidden`` (0 without image; after token merging: the merged count)
    token_mask: torch.Tensor  # [B, N] bool, False for padding
    spans: dict[str, tuple[int, int]]  # modality -> [start, end) in ``hidden``
    pooled: torch.Tensor  # [B, D] what heads read: ``cls``, or the mean of valid tokens (cfg.pooling)
    token_sizes: torch.Tensor | None = None  # [B, N] patches each token holds after token merging (None: none)


@dataclasses.dataclass
class DecodeCache:
    """What decoding keeps between steps (``VLMoE.encode(..., cache=)`` fills it, ``decode_step`` extends it)."""

    layers: list[LayerKV]  # one per block: keys and values of every token so far
    valid_bm: torch.Tensor | None = None  # [B, M] bool: the cached tokens a new token may attend (not padding)
    fused: bool = False  # the prefix holds more than one modality: text tokens use the fusion blocks' VL-FFN
    # block index -> its cached keys when it runs after a token merge (blocks between two merges share one);
    # the other blocks use ``valid_bm``
    merged: dict[int, MergedKeys] = dataclasses.field(default_factory=dict)

    def select(self, index_b: torch.Tensor) -> None:
        """Keep (and repeat / reorder) batch rows ``index_b``."""
        for layer in self.layers:
            layer.select(index_b)
        if self.valid_bm is not None:
            self.valid_bm = self.valid_bm[index_b]
        for keys in {id(k): k for k in self.merged.values()}.values():
            keys.select(index_b)


class VLMoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = nn.ModuleDict({m: EMBEDDINGS[m](cfg) for m in cfg.modalities})
        self.modality_type = nn.Embedding(len(cfg.modalities), cfg.hidden_size)
        # model.summary_tokens: [1, R, D] per grid modality, inserted after its CLS (encode)
        self.summary = nn.ParameterDict({m: nn.Parameter(torch.zeros(1, cfg.summary_tokens, cfg.hidden_size))
                                         for m in cfg.modalities if m in GRID_MODALITIES}) \
            if cfg.summary_tokens else None
        self.blocks = nn.ModuleList([Block(cfg, i) for i in range(cfg.num_layers)])
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.moe_stats = MoEStats()  # every MoE call of every pass records here (pipeline.model.moe_stats)
        self.reset_parameters()

    @property
    def token_embedding(self) -> nn.Embedding:
        return self.embeddings["text"].token

    def reset_parameters(self) -> None:
        """From-scratch init: truncated normal weights, zero biases, unit norms. Every expert is drawn
        independently (DeepSpeed deep-copies one expert module), and the random stream is independent of
        ep_size: all E experts of an MoE FFN are drawn in global order and each rank keeps its own, so a
        seed gives the same model for any EP layout."""
        if next(self.parameters()).is_meta:  # accounting builds on the meta device: nothing to draw
            return
        std = self.cfg.init_std
        expert_modules = {id(m) for ffn in self.sparse_ffns().values() for m in ffn.experts.modules()}
        for module in self.modules():
            if id(module) not in expert_modules:
                _init_module(module, std)
        own = [p for emb in self.embeddings.values() for p in emb.parameters(recurse=False)]
        for param in own + list(self.summary.values() if self.summary is not None else []):
            nn.init.trunc_normal_(param, std=std, a=-2 * std, b=2 * std)
        ep_rank = expert_parallel_rank(self.cfg.moe.ep_size)
        for ffn in self.sparse_ffns().values():
            if not isinstance(ffn, SparseFFN):  # dropless: fused [E_l, ...] tensors, same draws per expert
                draw_experts(ffn.experts, ffn.num_experts, expert_parallel_rank(ffn.ep_size),
                             lambda w: nn.init.trunc_normal_(w, std=std, a=-2 * std, b=2 * std))
                continue
            local = len(ffn.experts)
            for global_id in range(ffn.num_experts):
                drawn = copy.deepcopy(ffn.experts[0])
                drawn.apply(lambda m: _init_module(m, std))
                if global_id // local == ep_rank:
                    ffn.experts[global_id % local].load_state_dict(drawn.state_dict())

    def sparse_ffns(self) -> dict[str, MoEFFN]:
        """"blocks.{i}.ffn.{key}" -> every MoE FFN of the model."""
        return {name: m for name, m in self.named_modules() if isinstance(m, MoEFFN)}

    def update_expert_bias(self) -> dict[str, float]:
        """Aux-loss-free balancing (``moe.balance: bias``), once per optimizer step on every rank: the routes
        of every dropless FFN since the last update, summed over all ranks in one all-reduce, nudge its
        expert bias (``DroplessFFN.apply_bias_update``). Returns each FFN's load CV of those routes."""
        ffns = {name: m for name, m in self.sparse_ffns().items() if getattr(m, "balance", None) == "bias"}
        if not ffns:
            return {}
        counts = torch.stack([m.tokens_per_expert for m in ffns.values()])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(counts)
        for ffn, total in zip(ffns.values(), counts):
            ffn.apply_bias_update(total)
        return {name: ffn.load_cv(total) for (name, ffn), total in zip(ffns.items(), counts)}

    def new_cache(self) -> DecodeCache:
        return DecodeCache([LayerKV() for _ in self.blocks])

    def encode(self, inputs: dict[str, tuple[Any, ...]], causal: bool = False,
               cache: DecodeCache | None = None, text_prefix: torch.Tensor | None = None) -> EncoderOutput:
        """``inputs``: modality -> positional args of its embedding (image: (pixels,), text: (ids, mask),
        audio: (log-mel [B, T, F], real frames [B] or None)). ``cache`` (empty, ``new_cache()``): keep every
        block's keys and values for ``decode_step`` (the prefix of a generation, usually ``causal``).
        ``text_prefix`` [B] (with ``causal``): the first P_b text tokens are a bidirectional prefix
        (``blocks.attention_mask``); with mean pooling, ``pooled`` then averages the tokens before it only, so
        what the prefix's heads read does not depend on the text after it."""
        if text_prefix is not None and not causal:
            raise ValueError("text_prefix needs causal=True (without it every text token is bidirectional)")
        unknown = sorted(set(inputs) - set(self.cfg.modalities))
        if unknown or not inputs:
            raise ValueError(f"inputs for {unknown or 'no modality'}; model modalities: {self.cfg.modalities}")
        tokens, segments, start = [], [], 0
        for type_id, modality in enumerate(self.cfg.modalities):
            if modality not in inputs:
                continue
            x_bnd, valid_bn = self.embeddings[modality](*inputs[modality])
            if self.summary is not None and modality in self.summary:
                x_bnd, valid_bn = self._with_summary(x_bnd, valid_bn, self.summary[modality])
            x_bnd = x_bnd + self.modality_type.weight[type_id]
            tokens.append(x_bnd)
            segments.append(Segment(modality, start, start + x_bnd.shape[1], valid_bn))
            start += x_bnd.shape[1]
        if len({t.shape[0] for t in tokens}) != 1:
            raise ValueError(f"modalities have different batch sizes: {[t.shape[0] for t in tokens]}")
        x_bnd = torch.cat(tokens, dim=1) if len(tokens) > 1 else tokens[0]
        batch = x_bnd.shape[0]
        valid_bn = valid_tokens(segments, batch, x_bnd.device)  # once per pass: attention, MoE, pooling
        layouts = attention_layouts(self.cfg, segments, valid_bn, batch, causal, x_bnd.device, text_prefix)
        mask_b1nn = None if all(layouts) else \
            attention_mask(segments, valid_bn, batch, causal, x_bnd.device, text_prefix)
        if cache is not None:
            cache.valid_bm = valid_bn if valid_bn is not None else \
                torch.ones(batch, x_bnd.shape[1], dtype=torch.bool, device=x_bnd.device)
            cache.fused = len(segments) > 1
        image = next((s for s in segments if s.modality == "image"), None)
        merged_after = self.cfg.merged_after(image.end - image.start - self.cfg.lead_tokens) if image is not None \
            else [0] * len(self.blocks)
        size_bn, merged_keys = None, None
        for index, block in enumerate(self.blocks):
            if cache is not None and merged_keys is not None:
                cache.merged[index] = merged_keys
            x_bnd = block(x_bnd, segments, valid_bn, mask_b1nn, self.moe_stats,
                          cache=None if cache is None else cache.layers[index], layout=layouts[index])
            if merged_after[index]:  # config: the blocks after it are dense (layout None)
                x_bnd, size_bn, segments, valid_bn, mask_b1nn = merge_after_block(
                    x_bnd, size_bn, segments, merged_after[index], causal, text_prefix,
                    self.cfg.token_merge_proportional, self.cfg.lead_tokens)
                if cache is not None:
                    merged_keys = MergedKeys.of(valid_bn, size_bn, self.cfg.token_merge_proportional)
        hidden = self.norm(x_bnd)
        token_mask = valid_bn if valid_bn is not None else \
            torch.ones(batch, x_bnd.shape[1], dtype=torch.bool, device=hidden.device)
        spans = {s.modality: (s.start, s.end) for s in segments}
        num_image = spans["image"][1] - spans["image"][0] if "image" in spans else 0
        pool_mask = token_mask
        if text_prefix is not None and "text" in spans:
            text_start, text_end = spans["text"]
            cols_n = torch.arange(hidden.shape[1], device=hidden.device)[None]
            after_prefix = (cols_n >= text_start + text_prefix.to(hidden.device)[:, None]) & (cols_n < text_end)
            pool_mask = token_mask & ~after_prefix
        pooled = hidden[:, 0] if self.cfg.pooling == "cls" else masked_mean(hidden, pool_mask, size_bn)
        return EncoderOutput(hidden, hidden[:, 0], num_image, token_mask, spans, pooled, size_bn)

    @staticmethod
    def _with_summary(x_bnd: torch.Tensor, valid_bn: torch.Tensor | None, summary_1rd: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A grid modality's tokens [B, 1+P, D] -> [B, 1+R+P, D]: the summary tokens after the CLS (valid)."""
        batch, r = x_bnd.shape[0], summary_1rd.shape[1]
        summary_brd = summary_1rd.to(x_bnd.dtype).expand(batch, -1, -1)
        x_bnd = torch.cat([x_bnd[:, :1], summary_brd, x_bnd[:, 1:]], dim=1)
        if valid_bn is not None:
            ones_br = torch.ones(batch, r, dtype=torch.bool, device=valid_bn.device)
            valid_bn = torch.cat([valid_bn[:, :1], ones_br, valid_bn[:, 1:]], dim=1)
        return x_bnd, valid_bn

    def decode_step(self, input_ids_bn: torch.Tensor, positions_bn: torch.Tensor, cache: DecodeCache
                    ) -> torch.Tensor:
        """Text tokens ``input_ids_bn`` at text positions ``positions_bn`` after the cached prefix: each new
        token attends every valid cached token and the new ones before it; the cache grows by n.
        Returns the final (normed) hidden states [B, n, D]. Costs n positions, not the whole prefix."""
        if cache.valid_bm is None:
            raise ValueError("decode_step needs a cache filled by encode(..., cache=cache)")
        batch, n = input_ids_bn.shape
        x_bnd, _ = self.embeddings["text"](input_ids_bn, None, positions_bn)
        x_bnd = x_bnd + self.modality_type.weight[self.cfg.modalities.index("text")]
        cached = cache.valid_bm.shape[1]
        new_valid = torch.ones(batch, n, dtype=torch.bool, device=x_bnd.device)
        cache.valid_bm = torch.cat([cache.valid_bm, new_valid], dim=1)
        allowed_bnm = cache.valid_bm[:, None, :].expand(batch, n, cached + n).clone()
        allowed_bnm[:, :, cached:] &= torch.ones(n, n, dtype=torch.bool, device=x_bnd.device).tril()
        shared = {id(keys): keys for keys in cache.merged.values()}  # blocks between two merges share one
        masks = {key: keys.extend(n, x_bnd.dtype) for key, keys in shared.items()}
        segments = [Segment("text", 0, n, None)]
        for index, block in enumerate(self.blocks):
            mask_b1nm = masks[id(cache.merged[index])] if index in cache.merged else allowed_bnm[:, None]
            x_bnd = block(x_bnd, segments, None, mask_b1nm, self.moe_stats, cache=cache.layers[index],
                          fused=cache.fused)
        return self.norm(x_bnd)

    def encode_image(self, pixel_values: torch.Tensor) -> EncoderOutput:
        return self.encode({"image": (pixel_values,)})

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    causal: bool = False) -> EncoderOutput:
        return self.encode({"text": (input_ids, attention_mask)}, causal=causal)

    def encode_audio(self, features: torch.Tensor, lengths: torch.Tensor | None = None) -> EncoderOutput:
        """Log-mel [B, T, F] (``pipeline.model.audio_features.log_mel``) and real frame counts [B] (None: all)."""
        return self.encode({"audio": (features, lengths)})

    def fuse(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
             attention_mask: torch.Tensor | None = None, causal: bool = False) -> EncoderOutput:
        return self.encode({"image": (pixel_values,), "text": (input_ids, attention_mask)}, causal=causal)

    def forward(self, pixel_values: torch.Tensor | None = None, input_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, causal: bool = False,
                audio_features: torch.Tensor | None = None, audio_lengths: torch.Tensor | None = None
                ) -> EncoderOutput:
        """Dispatch on what is given (so a DeepSpeed engine wrapping the model can be called directly)."""
        inputs: dict[str, tuple[Any, ...]] = {}
        if pixel_values is not None:
            inputs["image"] = (pixel_values,)
        if input_ids is not None:
            inputs["text"] = (input_ids, attention_mask)
        if audio_features is not None:
            inputs["audio"] = (audio_features, audio_lengths)
        return self.encode(inputs, causal=causal)
