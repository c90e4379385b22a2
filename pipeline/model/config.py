"""Typed model configuration: ``ModelConfig`` (the transformer) and ``MoEConfig`` (its sparse FFNs).

Defaults are the demo size: hidden 192, 6 layers, 6 heads, mlp_ratio 4, image 64 with patch 8 (64 patches
+ CLS), text up to 32 tokens, 2 fusion layers, and 4 experts in every other layer (layers 1, 3, 5), top-1.
``AudioConfig`` (log-mel features and their patches) matters only with ``audio`` in ``modalities``.
Load from recipes with ``pipeline.config_utils.from_dict(ModelConfig, data)``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import field
from typing import Literal

KNOWN_MODALITIES = ("image", "text", "audio")  # modalities with an embedding implemented
DEFAULT_MODALITIES = ("image", "text")
GRID_MODALITIES = ("image", "audio")  # patches on a grid after a CLS (and summary tokens)


@dataclasses.dataclass
class AudioConfig:
    """Log-mel features (pipeline.model.audio_features) and their AST-style time x frequency patches."""

    sample_rate: int = field(default=16000, metadata={
        "help": "sample rate (Hz) of the waveforms features are computed from (the shards' rate)"})
    num_mel_bins: int = field(default=64, metadata={"help": "mel bands F of the log-mel features"})
    max_frames: int = field(default=400, metadata={
        "help": "log-mel frames T (25 ms windows, 10 ms hop) per clip: longer clips are cut, shorter padded "
                "and masked; the positions are learned for this length (other lengths interpolate them)"})
    patch_time: int = field(default=16, metadata={"help": "patch extent in frames"})
    patch_freq: int = field(default=16, metadata={"help": "patch extent in mel bands"})
    stride_time: int = field(default=16, metadata={
        "help": "patch step in frames (< patch_time: overlapping patches, as AST's 10 with patch 16)"})
    stride_freq: int = field(default=16, metadata={"help": "patch step in mel bands"})
    mean: float = field(default=-4.2677393, metadata={
        "help": "log-mel normalisation (x - mean) / (2 std), AST's AudioSet statistics by default"})
    std: float = field(default=4.5689974, metadata={"help": "see mean; > 0"})

    def __post_init__(self) -> None:
        for name in ("sample_rate", "num_mel_bins", "max_frames", "patch_time", "patch_freq", "stride_time",
                     "stride_freq"):
            if getattr(self, name) < 1:
                raise ValueError(f"audio.{name} must be >= 1, got {getattr(self, name)}")
        if self.patch_freq > self.num_mel_bins:
            raise ValueError(f"audio.patch_freq ({self.patch_freq}) must be <= audio.num_mel_bins "
                             f"({self.num_mel_bins})")
        if self.patch_time > self.max_frames:
            raise ValueError(f"audio.patch_time ({self.patch_time}) must be <= audio.max_frames ({self.max_frames})")
        for axis in ("time", "freq"):
            stride, patch = getattr(self, f"stride_{axis}"), getattr(self, f"patch_{axis}")
            if stride > patch:
                raise ValueError(f"audio.stride_{axis} ({stride}) must be <= audio.patch_{axis} ({patch}): a "
                                 "larger step skips frames / bands between patches")
        if self.std <= 0:
            raise ValueError(f"audio.std must be > 0, got {self.std}")

    def grid(self, frames: int | None = None) -> tuple[int, int]:
        """(frequency patches, time patches) of a [frames, num_mel_bins] log-mel (default max_frames)."""
        frames = self.max_frames if frames is None else frames
        return ((self.num_mel_bins - self.patch_freq) // self.stride_freq + 1,
                (frames - self.patch_time) // self.stride_time + 1)

    @property
    def num_patches(self) -> int:
        freq, time = self.grid()
        return freq * time


#: MoEConfig fields only ``impl: dropless`` reads; set to other than their default under gshard they are refused
DROPLESS_ONLY = ("score_func", "route_norm", "balance", "bias_update_rate", "z_loss_coef", "expert_ffn_size",
                 "shared_experts", "expert_groups", "max_groups_per_token", "grouped_mm")


@dataclasses.dataclass
class MoEConfig:
    """Sparse Mixture-of-Experts FFNs (``deepspeed.moe.layer.MoE``), one router per modality."""

    num_experts: int = field(default=4, metadata={"help": "experts per MoE FFN (all MoE layers alike)"})
    every: int = field(default=2, metadata={
        "help": "every N-th block is MoE (blocks N-1, 2N-1, ...); 0 = no MoE layers (dense baseline)"})
    layers: list[int] | None = field(default=None, metadata={
        "help": "explicit 0-based MoE block indices; overrides `every` when set ([] = dense)"})
    top_k: int = field(default=1, metadata={"help": "experts per token: 1 or 2"})
    capacity_factor: float = field(default=1.0, metadata={"help": "expert capacity factor in training"})
    eval_capacity_factor: float = field(default=1.0, metadata={"help": "expert capacity factor in eval"})
    min_capacity: int = field(default=4, metadata={
        "help": "minimum tokens per expert; every MoE call must carry at least this many tokens"})
    use_residual: bool = field(default=False, metadata={"help": "residual MoE (PR-MoE): dense MLP + experts"})
    noisy_gate_policy: Literal["Jitter", "RSample"] | None = field(default=None, metadata={
        "help": "router noise in training: Jitter, RSample or null"})
    drop_tokens: bool = field(default=True, metadata={
        "help": "drop tokens over capacity; false = capacity grows to fit (all-reduced over the EP group)"})
    use_rts: bool = field(default=True, metadata={"help": "random token selection when over capacity (top-1)"})
    top2_2nd_expert_sampling: bool = field(default=True, metadata={
        "help": "top-2: sample the 2nd expert with Gumbel noise (DeepSpeed default); false = 2nd best"})
    sparse_vl_ffn: bool = field(default=True, metadata={
        "help": "MoE layers inside the fusion blocks make the shared VL-FFN sparse too; false keeps it dense"})
    aux_loss_coef: float = field(default=0.01, metadata={"help": "weight of the load-balancing aux loss"})
    ep_size: int = field(default=1, metadata={"help": "expert-parallel group size (ranks sharing experts)"})
    routing: Literal["per_modality", "shared"] = field(default="per_modality", metadata={
        "help": "per_modality: a router + experts per modality (VL-MoE); shared: one pool for all (LIMoE)"})
    dispatch: Literal["indexed", "deepspeed"] = field(default="indexed", metadata={
        "help": "indexed: our gather/scatter dispatch (same gating, all-to-all, names); deepspeed: stock"})
    impl: Literal["gshard", "dropless"] = field(default="gshard", metadata={
        "help": "gshard: DeepSpeed's capacity-based MoE (VL-MoE); dropless: token-choice top-k, no capacity, "
                "fused experts (docs/MOE_DROPLESS.md)"})
    score_func: Literal["softmax", "sigmoid"] = field(default="softmax", metadata={
        "help": "dropless: router scores"})
    route_norm: bool | None = field(default=None, metadata={
        "help": "dropless: divide the chosen experts' weights by their sum (default: not for softmax top-1)"})
    balance: Literal["bias", "aux", "none"] = field(default="bias", metadata={
        "help": "dropless load balance: bias = aux-loss-free expert bias, aux = switch aux loss, none"})
    bias_update_rate: float = field(default=1e-3, metadata={"help": "dropless, balance bias: bias step per update"})
    z_loss_coef: float = field(default=0.0, metadata={"help": "dropless: weight of the router z-loss"})
    expert_ffn_size: int | None = field(default=None, metadata={
        "help": "dropless: width of each expert (fine-grained experts); default model.ffn_size"})
    shared_experts: int = field(default=0, metadata={
        "help": "dropless: always-on experts of expert_ffn_size beside the routed ones (DeepSeekMoE)"})
    expert_groups: int | None = field(default=None, metadata={
        "help": "dropless: split the experts into this many contiguous groups (e.g. one per node)"})
    max_groups_per_token: int | None = field(default=None, metadata={
        "help": "dropless: each token's experts come from at most this many groups"})
    grouped_mm: Literal["auto", "on", "off"] = field(default="auto", metadata={
        "help": "dropless experts: torch._grouped_mm (on), a loop of matmuls (off), auto = grouped on CUDA"})

    def __post_init__(self) -> None:
        if self.num_experts < 1:
            raise ValueError(f"moe.num_experts must be >= 1, got {self.num_experts}")
        if self.every < 0:
            raise ValueError(f"moe.every must be >= 0, got {self.every}")
        if self.layers is not None and any(i < 0 for i in self.layers):
            raise ValueError(f"moe.layers must be 0-based block indices, got {self.layers}")
        if self.impl == "gshard" and self.top_k not in (1, 2):
            raise ValueError(f"moe.top_k must be 1 or 2 with moe.impl gshard, got {self.top_k}")
        if self.impl == "dropless":
            self._check_dropless()
        else:
            defaults = {f.name: f.default for f in dataclasses.fields(self)}
            ignored = [name for name in DROPLESS_ONLY if getattr(self, name) != defaults[name]]
            if ignored:
                raise ValueError(f"moe.{', moe.'.join(ignored)} apply to moe.impl: dropless only (gshard would ignore "
                                 "them); set moe.impl: dropless or drop them")
        if self.capacity_factor <= 0 or self.eval_capacity_factor <= 0:
            raise ValueError("moe.capacity_factor and moe.eval_capacity_factor must be > 0")
        if self.min_capacity < 0:
            raise ValueError(f"moe.min_capacity must be >= 0, got {self.min_capacity}")
        if self.ep_size < 1:
            raise ValueError(f"moe.ep_size must be >= 1, got {self.ep_size}")
        if self.num_experts % self.ep_size:
            raise ValueError(f"moe.num_experts ({self.num_experts}) must be divisible by moe.ep_size "
                             f"({self.ep_size})")

    def _check_dropless(self) -> None:
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"moe.top_k must be in 1..num_experts ({self.num_experts}), got {self.top_k}")
        if self.z_loss_coef < 0 or self.bias_update_rate < 0:
            raise ValueError("moe.z_loss_coef and moe.bias_update_rate must be >= 0")
        if self.z_loss_coef and self.aux_loss_coef <= 0:
            raise ValueError("moe.z_loss_coef needs moe.aux_loss_coef > 0 (the trainer scales MoE losses by it)")
        if self.expert_ffn_size is not None and self.expert_ffn_size < 1:
            raise ValueError(f"moe.expert_ffn_size must be >= 1, got {self.expert_ffn_size}")
        if self.shared_experts < 0:
            raise ValueError(f"moe.shared_experts must be >= 0, got {self.shared_experts}")
        if (self.expert_groups is None) != (self.max_groups_per_token is None):
            raise ValueError("moe.expert_groups and moe.max_groups_per_token must be set together")
        if self.expert_groups is not None:
            groups, limit = self.expert_groups, self.max_groups_per_token
            if groups < 1 or self.num_experts % groups:
                raise ValueError(f"moe.expert_groups ({groups}) must divide moe.num_experts ({self.num_experts})")
            if not 1 <= limit <= groups:
                raise ValueError(f"moe.max_groups_per_token must be in 1..expert_groups ({groups}), got {limit}")
            if limit * (self.num_experts // groups) < self.top_k:
                raise ValueError(f"moe.top_k ({self.top_k}) exceeds the experts of {limit} group(s) "
                                 f"({limit * (self.num_experts // groups)})")

    def layer_indices(self, num_layers: int) -> list[int]:
        """0-based indices of the MoE blocks in a model with ``num_layers`` blocks."""
        if self.layers is not None:
            bad = [i for i in self.layers if i >= num_layers]
            if bad:
                raise ValueError(f"moe.layers {bad} out of range for num_layers={num_layers}")
            return sorted(set(self.layers))
        if self.every == 0:
            return []
        return [i for i in range(num_layers) if i % self.every == self.every - 1]


@dataclasses.dataclass
class ModelConfig:
    """VL-MoE multiway transformer: shared attention, FFN chosen by modality, MoE in some layers."""

    hidden_size: int = field(default=192, metadata={"help": "model width D"})
    num_layers: int = field(default=6, metadata={"help": "transformer blocks"})
    num_heads: int = field(default=6, metadata={"help": "attention heads (hidden_size divisible by it)"})
    mlp_ratio: float = field(default=4.0, metadata={"help": "FFN inner width / hidden_size"})
    num_fusion_layers: int = field(default=2, metadata={
        "help": "top blocks using one shared VL-FFN when image and text are fused (VLMo: 2 of 12)"})
    modalities: list[str] = field(default_factory=lambda: list(DEFAULT_MODALITIES), metadata={
        "help": f"modalities with their own embedding and FFNs, in sequence and MoE call order; any of "
                f"{list(KNOWN_MODALITIES)}"})
    image_size: int = field(default=64, metadata={
        "help": "image side the position embeddings are learned for (other sizes interpolate them)"})
    patch_size: int = field(default=8, metadata={"help": "image patch side"})
    patch_embed: Literal["linear", "conv_stem"] = field(default="linear", metadata={
        "help": "linear = one patch_size x patch_size conv (ViT); conv_stem = log2(patch_size) 3x3 stride-2 "
                "conv+BN+ReLU blocks and a 1x1 conv (Xiao et al. 2021; patch_size a power of 2)"})
    num_channels: int = field(default=3, metadata={"help": "image channels"})
    coord_channels: bool = field(default=False, metadata={
        "help": "append x and y coordinate planes (-1..1) to the pixels before the patch embedding "
                "(CoordConv, Liu et al. 2018): patch tokens then carry where they are in their own "
                "features, not only through the added position embedding"})
    vocab_size: int = field(default=8192, metadata={"help": "text vocabulary size (>= the tokenizer's)"})
    max_text_len: int = field(default=32, metadata={"help": "text positions (>= data.text_len)"})
    dropout: float = field(default=0.0, metadata={"help": "dropout after attention and FFN"})
    attn_dropout: float = field(default=0.0, metadata={"help": "attention-probability dropout"})
    qk_norm: bool = field(default=False, metadata={
        "help": "LayerNorm on each head's queries and keys before the dot product (ViT-22B, Dehghani et al. "
                "2023; Chameleon): attention logits start at cosine x sqrt(head dim) instead of near 0, so "
                "attention can sharpen from the first steps (effect: BENCHMARKS.md, VQA learning speed)"})
    attention: Literal["dense", "local"] = field(default="dense", metadata={
        "help": "self-attention of every block: dense = every token sees every token; local = image patches "
                "attend their attention_window x attention_window window (audio patches: every frequency row "
                "x attention_window time patches) plus the global tokens (each CLS, all text), which attend "
                "everything (Swin / ViTDet windows; when to use which: README, Long visual sequences)"})
    attention_window: int = field(default=8, metadata={
        "help": "window side in patches with attention: local (a grid smaller than it is one window)"})
    attention_shift: bool = field(default=True, metadata={
        "help": "with attention: local, offset the windows of odd blocks by half a window (Swin's shifted "
                "windows), so information crosses window borders"})
    attention_global_layers: list[int] = field(default_factory=list, metadata={
        "help": "blocks that keep dense attention with attention: local (ViTDet: a few evenly spaced blocks)"})
    summary_tokens: int = field(default=0, metadata={
        "help": "learned summary tokens after the CLS of each grid modality (image, audio): global tokens, so with "
                "attention: local every window reaches every other through them in one block (the summary "
                "tokens of global-local attention; registers, Darcet et al. 2023); no position embedding, "
                "never merged, routed to the modality's experts like its CLS; 0 = none"})
    token_merge: int = field(default=0, metadata={
        "help": "image patch tokens merged away after each block of token_merge_layers (ToMe's r, Bolya et al. "
                "2022: bipartite soft matching, size-weighted averages; never the CLS, text or audio tokens); "
                "a fixed count, so the MoE calls keep their token counts; 0 = off (when to use: README, Long "
                "visual sequences)"})
    token_merge_layers: list[int] | None = field(default=None, metadata={
        "help": "blocks after which token_merge patches are merged (each merge at most half of the patches "
                "left); default: every block but the last (ToMe). Blocks after the first merge need dense "
                "attention (attention_global_layers with attention: local): merged patches are no grid"})
    token_merge_proportional: bool = field(default=True, metadata={
        "help": "with token_merge, proportional attention: a merged token's attention logit gets log(its "
                "patches), so it weighs as the tokens it replaced (ToMe eq. 1)"})
    pooling: Literal["cls", "mean"] = field(default="cls", metadata={
        "help": "pooled output the heads read: cls = first token (VLMo); mean = mean of the valid tokens "
                "(open_clip pool_type='avg'; effect on small data: BENCHMARKS.md, VQA learning speed)"})
    layer_norm_eps: float = field(default=1e-6, metadata={"help": "LayerNorm epsilon"})
    init_std: float = field(default=0.02, metadata={"help": "std of the truncated-normal weight init"})
    moe: MoEConfig = field(default_factory=MoEConfig, metadata={"help": "sparse FFN settings"})
    audio: AudioConfig = field(default_factory=AudioConfig, metadata={
        "help": "log-mel features and audio patches (used with 'audio' in modalities)"})

    def __post_init__(self) -> None:
        if isinstance(self.moe, dict):
            self.moe = MoEConfig(**self.moe)
        if isinstance(self.audio, dict):
            self.audio = AudioConfig(**self.audio)
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_heads "
                             f"({self.num_heads})")
        if not 0 <= self.num_fusion_layers <= self.num_layers:
            raise ValueError(f"num_fusion_layers must be in [0, num_layers={self.num_layers}], "
                             f"got {self.num_fusion_layers}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size ({self.image_size}) must be a multiple of patch_size "
                             f"({self.patch_size})")
        if self.patch_embed == "conv_stem" and (self.patch_size < 2 or self.patch_size & (self.patch_size - 1)):
            raise ValueError(f"patch_embed conv_stem needs patch_size a power of 2 (>= 2), got {self.patch_size}")
        unknown = [m for m in self.modalities if m not in KNOWN_MODALITIES]
        if unknown or not self.modalities or len(set(self.modalities)) != len(self.modalities):
            raise ValueError(f"modalities {self.modalities}: must be distinct names from "
                             f"{list(KNOWN_MODALITIES)}")
        if self.mlp_ratio <= 0 or self.vocab_size < 1 or self.max_text_len < 1:
            raise ValueError("mlp_ratio, vocab_size and max_text_len must be positive")
        self.moe.layer_indices(self.num_layers)  # validates explicit indices
        if self.attention_window < 1:
            raise ValueError(f"attention_window must be >= 1, got {self.attention_window}")
        if self.summary_tokens < 0:
            raise ValueError(f"summary_tokens must be >= 0, got {self.summary_tokens}")
        bad = [i for i in self.attention_global_layers if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(f"attention_global_layers {bad}: block indices must be in [0, {self.num_layers})")
        self._check_token_merge()

    def _check_token_merge(self) -> None:
        if self.token_merge < 0:
            raise ValueError(f"token_merge must be >= 0, got {self.token_merge}")
        layers = self.token_merge_layers or []
        bad = [i for i in layers if not 0 <= i < self.num_layers - 1]
        if bad:
            raise ValueError(f"token_merge_layers {bad}: merges happen after a block and before the next, so "
                             f"indices must be in [0, {self.num_layers - 1}) (num_layers {self.num_layers})")
        if not self.token_merge:
            return
        if not self.token_merge_blocks:
            raise ValueError("token_merge > 0 needs at least one block in token_merge_layers")
        first = self.token_merge_blocks[0]
        local = [i for i in range(first + 1, self.num_layers) if self.local_attention_block(i)]
        if local:
            raise ValueError(f"attention: local in blocks {local}, after the first token merge (block {first} of "
                             f"token_merge_layers): merged patches are no longer a grid; add them to "
                             f"attention_global_layers, or merge only after the last local block")

    @property
    def ffn_size(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def patch_in_channels(self) -> int:
        """Input channels of the patch embedding: the image's, plus 2 with ``coord_channels``."""
        return self.num_channels + (2 if self.coord_channels else 0)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def lead_tokens(self) -> int:
        """Tokens of a grid modality (image, audio) before its patches: its CLS, then ``summary_tokens``."""
        return 1 + self.summary_tokens

    @property
    def token_merge_blocks(self) -> list[int]:
        """Sorted blocks after which image patches are merged ([] with token_merge 0)."""
        if not self.token_merge:
            return []
        layers = range(self.num_layers - 1) if self.token_merge_layers is None else self.token_merge_layers
        return sorted(set(layers))

    def local_attention_block(self, index: int) -> bool:
        """Block ``index`` runs local attention (``attention: local`` and not in ``attention_global_layers``)."""
        return self.attention == "local" and index not in self.attention_global_layers

    def shifted_attention_block(self, index: int) -> bool:
        """Block ``index``'s windows are shifted (odd blocks with ``attention_shift``; Swin)."""
        return self.attention_shift and index % 2 == 1

    def token_merge_problem(self, image_size: int) -> str | None:
        """Why ``token_merge`` does not fit images of ``image_size`` (a merge takes at most half of the patches
        left: more would silently merge fewer), or None. The recipe checks it for ``data.image_size``; a model
        run on other sizes merges min(token_merge, half) (``merged_after``)."""
        patches = (image_size // self.patch_size) ** 2
        merged = self.merged_after(patches)
        for index in self.token_merge_blocks:
            if merged[index] < self.token_merge:
                left = patches - sum(merged[:index])
                return (f"token_merge ({self.token_merge}) after block {index}: only {left} image patches are "
                        f"left there (image_size {image_size}, patch_size {self.patch_size}, token_merge_layers "
                        f"{self.token_merge_blocks}) and one merge takes at most half; lower token_merge or merge "
                        "after fewer blocks")
        return None

    def merged_after(self, patches: int) -> list[int]:
        """Image patch tokens merged away after each block for an image of ``patches`` patches: token_merge
        after each merging block, fewer where under 2 x token_merge are left (a merge takes at most half)."""
        merged = [0] * self.num_layers
        for index in self.token_merge_blocks:
            merged[index] = min(self.token_merge, patches // 2)
            patches -= merged[index]
        return merged

    def block_tokens(self, tokens: dict[str, int]) -> list[dict[str, int]]:
        """Tokens of each modality (``tokens``: modality -> count, the image's CLS and summary tokens included)
        entering each block: fewer image tokens after each token merge."""
        merged = self.merged_after(tokens["image"] - self.lead_tokens) if "image" in tokens else [0] * self.num_layers
        blocks, current = [], dict(tokens)
        for index in range(self.num_layers):
            blocks.append(dict(current))
            if merged[index]:
                current["image"] -= merged[index]
        return blocks

    @property
    def moe_layers(self) -> list[int]:
        return self.moe.layer_indices(self.num_layers)

    def is_fusion_layer(self, index: int) -> bool:
        return index >= self.num_layers - self.num_fusion_layers

    def ffn_keys(self, index: int) -> list[str]:
        """Names of the FFNs block ``index`` holds: one per modality, plus ``vl`` in fusion layers; an
        MoE layer with shared routing holds the single pool ``shared`` instead."""
        if index in self.moe_layers and self.moe.routing == "shared":
            return ["shared"]
        keys = list(self.modalities)
        if self.is_fusion_layer(index) and len(self.modalities) > 1:
            keys.append("vl")
        return keys
