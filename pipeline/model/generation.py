"""Text generation with the multiway transformer as a prefix-LM: greedy and beam search, with a KV cache.

Shapes: B batch, K beams, P prompt length, T generated tokens, V vocab, D hidden.

The prefix is the media (image and/or audio tokens, bidirectional) and a right-padded text prompt (causal,
or bidirectional with ``prompt_bidirectional``; at least the BOS token, e.g. ``[CLS]``); ``lm_head`` turns
the last hidden state into next-token logits (the pretraining MLM head, tied to the token embedding).
With the cache, the prefix runs once (``VLMoE.encode(..., cache=)``) and every new token costs one position
(``VLMoE.decode_step``); without it (``use_cache=False``) every step re-encodes media + prompt + the tokens
so far, which is what the cached path must reproduce token for token (tests/test_generation.py).

    out = generate(model, heads["mlm"], {"image": (pixels,)}, prompt_ids, prompt_mask,
                   eos_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id,
                   options=DecodeOptions(num_beams=4, max_new_tokens=20))
    captions = tok.batch_decode(out.tokens, skip_special_tokens=True)

MoE FFNs decode **without dropping tokens** (``drop_tokens`` off while generating: each expert's capacity
grows to what it was routed) and top-2 gates take the second-best expert instead of a sampled one, so a
token's output never depends on the other tokens of its step or on chance. Under
expert parallelism every rank must make the same MoE calls: with ``sync`` each step all-reduces "anything
left to decode?" and a rank whose batch is finished keeps stepping (on padding) until every rank's is.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.model.moe import MoEFFN, SparseFFN


@dataclasses.dataclass
class DecodeOptions:
    """How ``generate`` searches; recipes expose these as task options."""

    num_beams: int = dataclasses.field(default=1, metadata={"help": "beams per sample; 1 = greedy"})
    max_new_tokens: int = dataclasses.field(default=30, metadata={
        "help": "tokens generated at most per sample, EOS included (capped by model.max_text_len - prompt length)"})
    min_new_tokens: int = dataclasses.field(default=1, metadata={
        "help": "EOS is forbidden before this many tokens (1: no empty output)"})
    length_penalty: float = dataclasses.field(default=1.0, metadata={
        "help": "beam search ranks finished sequences by sum log p / length ** length_penalty (length counts "
                "the EOS); > 0 favours longer outputs, 0 = raw log-probability"})
    use_cache: bool = dataclasses.field(default=True, metadata={
        "help": "KV cache: each new token costs one position; false recomputes the whole prefix every step"})

    def __post_init__(self) -> None:
        if self.num_beams < 1 or self.max_new_tokens < 1 or self.min_new_tokens < 0:
            raise ValueError(f"decoding needs num_beams >= 1, max_new_tokens >= 1, min_new_tokens >= 0; got "
                             f"{self.num_beams}, {self.max_new_tokens}, {self.min_new_tokens}")
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError(f"min_new_tokens ({self.min_new_tokens}) > max_new_tokens ({self.max_new_tokens})")


@dataclasses.dataclass
class Generated:
    tokens: torch.Tensor  # [B, T] long: generated tokens without the EOS, then pad_token_id
    lengths: torch.Tensor  # [B] long: tokens before the EOS (all T when no EOS came)
    scores: torch.Tensor  # [B] float: log-probability of the output (beam: divided by length ** length_penalty)
    steps: int = 0  # decoding steps run (with ``sync``: the most any rank needed)


@contextlib.contextmanager
def dropless(model: nn.Module) -> Iterator[None]:
    """Inside the block every MoE gate of ``model`` keeps all tokens (capacity = the largest expert load) and
    routes deterministically (top-2: the second-best expert, not DeepSpeed's Gumbel-sampled one, which it
    draws in eval mode too): a token's output depends only on the token."""
    gates = [m.deepspeed_moe.gate for m in model.modules() if isinstance(m, SparseFFN)]
    before = [(g.drop_tokens, g.top2_2nd_expert_sampling) for g in gates]
    for gate in gates:
        gate.drop_tokens, gate.top2_2nd_expert_sampling = False, False
    try:
        yield
    finally:
        for gate, (drop, sampling) in zip(gates, before):
            gate.drop_tokens, gate.top2_2nd_expert_sampling = drop, sampling


def needs_sync(model: nn.Module) -> bool:
    """True when the model's MoE calls are collectives (expert parallelism over an initialised group)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return False
    return any(m.ep_size > 1 for m in model.modules() if isinstance(m, MoEFFN))


class _Decoder:
    """Next-token logits for B rows, cached (one position per step) or recomputed (the whole prefix)."""

    def __init__(self, model: nn.Module, lm_head: Callable[[torch.Tensor], torch.Tensor],
                 media: dict[str, tuple[Any, ...]], prompt_ids_bp: torch.Tensor, prompt_mask_bp: torch.Tensor,
                 use_cache: bool, pad_token_id: int, prompt_bidirectional: bool = False):
        self.model, self.lm_head, self.media, self.use_cache = model, lm_head, media, use_cache
        self.prompt_ids_bp, self.prompt_mask_bp = prompt_ids_bp, prompt_mask_bp.bool()
        self.prompt_len_b = self.prompt_mask_bp.long().sum(1)
        self.prompt_bidirectional = prompt_bidirectional
        self.rows = torch.arange(prompt_ids_bp.shape[0], device=prompt_ids_bp.device)  # media/prompt row of each
        self.generated_bt = prompt_ids_bp.new_zeros(prompt_ids_bp.shape[0], 0)
        self.pad_token_id = pad_token_id
        self.cache = model.new_cache() if use_cache else None
        self.max_positions = model.cfg.max_text_len

    def first(self) -> torch.Tensor:
        """[B, V] logits of the token after each prompt's last real token."""
        if self.use_cache:
            out = self.model.encode({**self.media, "text": (self.prompt_ids_bp, self.prompt_mask_bp.long())},
                                    causal=True, cache=self.cache, text_prefix=self._prefix(self.prompt_len_b))
            last_b = (self.prompt_len_b - 1).clamp(min=0)
            start = out.spans["text"][0]
            hidden_bd = out.hidden[torch.arange(len(last_b), device=last_b.device), start + last_b]
            return self.lm_head(hidden_bd).float()
        return self._recompute()

    def _prefix(self, prompt_len_b: torch.Tensor) -> torch.Tensor | None:
        """The bidirectional text prefix of each row: its whole prompt, or none (a causal prompt)."""
        return prompt_len_b if self.prompt_bidirectional else None

    def select(self, index_b: torch.Tensor) -> None:
        """Rows ``index_b`` (into the current rows) continue: beam reordering and expansion."""
        self.rows = self.rows[index_b]
        self.generated_bt = self.generated_bt[index_b]
        if self.cache is not None:
            self.cache.select(index_b)

    def next(self, tokens_b: torch.Tensor) -> torch.Tensor:
        """Append ``tokens_b``; [B, V] logits of the token after it."""
        self.generated_bt = torch.cat([self.generated_bt, tokens_b[:, None]], dim=1)
        if not self.use_cache:
            return self._recompute()
        step = self.generated_bt.shape[1] - 1
        # past the positions a rank's own outputs can use (only a rank stepping in lockstep gets there)
        positions_b = (self.prompt_len_b[self.rows] + step).clamp(max=self.max_positions - 1)
        hidden_b1d = self.model.decode_step(tokens_b[:, None], positions_b[:, None], self.cache)
        return self.lm_head(hidden_b1d[:, 0]).float()

    def _recompute(self) -> torch.Tensor:
        """Re-encode media + each row's prompt followed directly by its generated tokens (no padding between)."""
        batch, length = len(self.rows), self.generated_bt.shape[1]
        prompt_len_b = self.prompt_len_b[self.rows]
        width = min(self.prompt_ids_bp.shape[1] + length, self.max_positions)
        ids_bl = self.prompt_ids_bp.new_full((batch, width), self.pad_token_id)
        mask_bl = torch.zeros(batch, width, dtype=torch.long, device=ids_bl.device)
        cols = torch.arange(width, device=ids_bl.device)[None]
        in_prompt = cols < prompt_len_b[:, None]
        prompt_src = self.prompt_ids_bp[self.rows]
        ids_bl[:, :prompt_src.shape[1]] = torch.where(in_prompt[:, :prompt_src.shape[1]], prompt_src,
                                                      ids_bl[:, :prompt_src.shape[1]])
        gen_col = cols - prompt_len_b[:, None]  # index into generated tokens
        in_gen = (gen_col >= 0) & (gen_col < length)
        if length:
            gathered = self.generated_bt.gather(1, gen_col.clamp(0, length - 1))
            ids_bl = torch.where(in_gen, gathered, ids_bl)
        mask_bl[in_prompt | in_gen] = 1
        media = {m: tuple(a[self.rows] if isinstance(a, torch.Tensor) else a for a in args)
                 for m, args in self.media.items()}
        # a throwaway cache: MoE calls below min_capacity (few rows, short prompts) are padded as when cached
        out = self.model.encode({**media, "text": (ids_bl, mask_bl)}, causal=True, cache=self.model.new_cache(),
                                text_prefix=self._prefix(prompt_len_b))
        last_b = (prompt_len_b + length - 1).clamp(max=width - 1)
        hidden_bd = out.hidden[torch.arange(batch, device=ids_bl.device), out.spans["text"][0] + last_b]
        return self.lm_head(hidden_bd).float()


def _all_done(done: bool, sync: bool, device: torch.device) -> bool:
    if not sync:
        return done
    flag = torch.tensor([0.0 if done else 1.0], device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return flag.item() == 0.0


@torch.no_grad()
def generate(model: nn.Module, lm_head: Callable[[torch.Tensor], torch.Tensor], media: dict[str, tuple[Any, ...]],
             prompt_ids_bp: torch.Tensor, prompt_mask_bp: torch.Tensor, *, eos_token_id: int, pad_token_id: int,
             options: DecodeOptions | None = None, sync: bool | None = None,
             prompt_bidirectional: bool = False) -> Generated:
    """Continue each right-padded prompt after its own last real token (see the module docstring).

    ``media``: modality -> embedding args as ``VLMoE.encode`` takes them ({} for text only). ``sync``: step in
    lockstep with every rank (default ``needs_sync(model)``); every rank must then call ``generate``.
    ``prompt_bidirectional``: the prompt's tokens attend each other both ways (``VLMoE.encode(text_prefix=)``),
    as a model trained with that prefix-LM mask expects (VQA's answer LM: the question is the prefix); the
    default is a causal prompt, as captioning trains."""
    options = options or DecodeOptions()
    sync = needs_sync(model) if sync is None else sync
    prompt_mask_bp = prompt_mask_bp.bool()
    if not bool(prompt_mask_bp[:, 0].all()):
        raise ValueError("every prompt needs at least one token (e.g. [CLS]) and must be right-padded")
    room = model.cfg.max_text_len - int(prompt_mask_bp.long().sum(1).max())
    if room < 1:
        raise ValueError(f"prompts of {room + options.max_new_tokens} tokens leave no text position to generate "
                         f"into (model.max_text_len={model.cfg.max_text_len})")
    max_new = min(options.max_new_tokens, room)
    with dropless(model):
        decoder = _Decoder(model, lm_head, media, prompt_ids_bp, prompt_mask_bp, options.use_cache, pad_token_id,
                           prompt_bidirectional)
        if options.num_beams == 1:
            return _greedy(decoder, max_new, options, eos_token_id, pad_token_id, sync)
        return _beam(decoder, max_new, options, eos_token_id, pad_token_id, sync)


def _greedy(decoder: _Decoder, max_new: int, options: DecodeOptions, eos: int, pad: int, sync: bool) -> Generated:
    logits_bv = decoder.first()
    batch, device = logits_bv.shape[0], logits_bv.device
    finished_b = torch.zeros(batch, dtype=torch.bool, device=device)
    lengths_b = torch.full((batch,), max_new, dtype=torch.long, device=device)
    scores_b = torch.zeros(batch, device=device)
    tokens: list[torch.Tensor] = []
    step = 0
    while True:
        if step < max_new:
            logp_bv = F.log_softmax(logits_bv, dim=-1)
            if step < options.min_new_tokens:
                logp_bv[:, eos] = float("-inf")
            best_b = logp_bv.argmax(-1)
            scores_b += torch.where(finished_b, 0.0, logp_bv.gather(1, best_b[:, None])[:, 0])
            ended_b = ~finished_b & (best_b == eos)
            lengths_b[ended_b] = step
            finished_b |= ended_b
            token_b = torch.where(finished_b, torch.full_like(best_b, pad), best_b)
            tokens.append(token_b)
        else:
            token_b = torch.full((batch,), pad, dtype=torch.long, device=device)
        step += 1
        if _all_done(bool(finished_b.all()) or step >= max_new, sync, device):
            break
        logits_bv = decoder.next(token_b)
    tokens_bt = torch.stack(tokens, 1) if tokens else torch.zeros(batch, 0, dtype=torch.long, device=device)
    width = int(lengths_b.max()) if batch else 0
    return Generated(tokens_bt[:, :width], lengths_b, scores_b, step)


def _beam(decoder: _Decoder, max_new: int, options: DecodeOptions, eos: int, pad: int, sync: bool) -> Generated:
    """Beam search as transformers' BeamSearchScorer (early_stopping=False): each step keeps the best K of the
    2K top candidates that do not end; a candidate ending in EOS among the top K becomes a finished hypothesis;
    a sample is done when it has K hypotheses and its best running beam cannot beat the worst of them."""
    beams, penalty = options.num_beams, options.length_penalty
    logits_bv = decoder.first()
    batch, vocab, device = logits_bv.shape[0], logits_bv.shape[1], logits_bv.device
    expand = torch.arange(batch, device=device).repeat_interleave(beams)
    decoder.select(expand)
    logits_nv = logits_bv[expand]  # N = B*K rows, beam-major within a sample
    beam_scores_bk = torch.full((batch, beams), float("-inf"), device=device)
    beam_scores_bk[:, 0] = 0.0  # the first step picks from one beam only: no duplicate beams
    sequences_nt = torch.zeros(batch * beams, 0, dtype=torch.long, device=device)
    hypotheses: list[list[tuple[float, list[int]]]] = [[] for _ in range(batch)]
    done = [False] * batch
    step = 0
    while True:
        if step < max_new and not all(done):
            logp_nv = F.log_softmax(logits_nv, dim=-1)
            if step < options.min_new_tokens:
                logp_nv[:, eos] = float("-inf")
            cand_bm = (beam_scores_bk.reshape(-1, 1) + logp_nv).view(batch, beams * vocab)
            top_scores_bc, top_index_bc = cand_bm.topk(2 * beams, dim=1)
            next_scores = torch.zeros(batch, beams, device=device)
            next_tokens = torch.full((batch, beams), pad, dtype=torch.long, device=device)
            next_source = torch.zeros(batch, beams, dtype=torch.long, device=device)
            top_scores, top_index = top_scores_bc.tolist(), top_index_bc.tolist()
            for b in range(batch):
                if done[b]:
                    continue
                kept = 0
                for rank, (score, index) in enumerate(zip(top_scores[b], top_index[b])):
                    source, token = divmod(index, vocab)
                    if token == eos:
                        if rank < beams and score > float("-inf"):
                            _add(hypotheses[b], beams, score / (step + 1) ** penalty,
                                 sequences_nt[b * beams + source].tolist())
                        continue
                    next_scores[b, kept], next_tokens[b, kept] = score, token
                    next_source[b, kept] = source
                    kept += 1
                    if kept == beams:
                        break
                best_running = float(next_scores[b, 0]) / (step + 1) ** penalty
                done[b] = len(hypotheses[b]) == beams and best_running <= hypotheses[b][-1][0]
            rows = (torch.arange(batch, device=device)[:, None] * beams + next_source).reshape(-1)
            sequences_nt = torch.cat([sequences_nt[rows], next_tokens.reshape(-1, 1)], dim=1)
            beam_scores_bk = next_scores
            decoder.select(rows)
            tokens_n = next_tokens.reshape(-1)
        else:
            tokens_n = torch.full((batch * beams,), pad, dtype=torch.long, device=device)
        step += 1
        local_done = all(done) or step >= max_new
        if _all_done(local_done, sync, device):
            break
        logits_nv = decoder.next(tokens_n)
    final_len = min(step, max_new)
    for b in range(batch):  # samples still running at max length: their beams are hypotheses too
        if not done[b]:
            for k in range(beams):
                score = float(beam_scores_bk[b, k])
                if score > float("-inf"):
                    _add(hypotheses[b], beams, score / final_len ** penalty, sequences_nt[b * beams + k].tolist())
    best = [max(h, key=lambda item: item[0]) for h in hypotheses]
    lengths_b = torch.tensor([len(seq) for _, seq in best], dtype=torch.long, device=device)
    width = int(lengths_b.max()) if batch else 0
    tokens_bt = torch.full((batch, width), pad, dtype=torch.long, device=device)
    for b, (_, seq) in enumerate(best):
        if seq:
            tokens_bt[b, :len(seq)] = torch.tensor(seq, dtype=torch.long, device=device)
    scores_b = torch.tensor([score for score, _ in best], device=device)
    return Generated(tokens_bt, lengths_b, scores_b, step)


def _add(hyps: list[tuple[float, list[int]]], beams: int, score: float, sequence: list[int]) -> None:
    """Keep the ``beams`` best (score, tokens without EOS), sorted best first."""
    hyps.append((score, sequence))
    hyps.sort(key=lambda item: -item[0])
    del hyps[beams:]
