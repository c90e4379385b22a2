"""The training loop behind ``pipeline.train``: build, (resume | init_from), then steps with periodic
log / eval / checkpoint, and a checkpoint + clean exit on SIGTERM/SIGUSR1.

MoE invariant: every rank runs the same number of steps (stop decisions are all-reduced) and
fixed-shape batches; eval pads to equal batch counts (``pipeline.run.eval_loop``).
"""
from __future__ import annotations

import atexit
import dataclasses
import json
import logging
import signal
import time
from pathlib import Path
from typing import Any

import torch

from pipeline.run import checkpoint
from pipeline.run.build import apply_freeze, build_engine, build_model, build_task, load_tokenizer
from pipeline.data.loader import build_eval_loader, build_train_loader, strip_meta
from pipeline.run.distributed import Dist, all_reduce_max, all_reduce_sum, barrier, watch_launcher
from pipeline.run.ds_config import build_ds_config, load_engine_json, precision, zero_stage
from pipeline.run.eval_loop import run_eval, to_device, write_eval
from pipeline.recipe import InitConfig, dump_recipe, load_recipe
from pipeline.routing_pictures import log_routing_images
from pipeline.run.run_dir import RunDir
from pipeline.run.step_guard import NonFiniteTraining, StepGuard
from pipeline.run.universal import universal_resume_config
from pipeline.tasks import DistInfo
from pipeline.run.tb_logging import (MetricsSink, TrainWindow, console_line, expert_load_scalars,
                                     measure_peak_tflops)

log = logging.getLogger(__name__)

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
DATA_SEED_STRIDE = 1_000_003  # data stream seed = seed + stride * step at which the loader started
PEAK_TRIALS = 3
EVAL_SEED_OFFSET = 99_991  # evaluation RNG seed = train.seed + offset, whatever the step


@dataclasses.dataclass
class RunState:
    step: int = 0
    samples_seen: int = 0
    data_seed: int = 0
    resumes: int = 0
    world_size: int = 1


class Trainer:
    def __init__(self, recipe: Any, ds_config: dict[str, Any], run_dir: Path, dist: Dist,
                 engine: Any, task: Any, state: RunState, peak_tflops: float):
        self.recipe, self.model_cfg, self.ds_config = recipe, recipe.model, ds_config
        self.run_dir, self.dist, self.engine, self.task, self.state = run_dir, dist, engine, task, state
        self.run = RunDir(run_dir)
        self.sink = MetricsSink(self.run, dist.is_main)
        self.stop_signal: int | None = None
        self.flops_per_sample = _train_flops_per_sample(recipe)
        self.peak_tflops = peak_tflops
        self.warned_mfu = False
        self.window = TrainWindow()
        self.worker_skips: dict[int, int] = {}
        self.loader_iter = None
        self.guard = StepGuard(engine, dist, recipe.train.nonfinite_budget, recipe.model.moe.ep_size,
                               precision(ds_config), zero_stage(ds_config))

    # ------------------------------------------------------------------------------------- build
    @classmethod
    def create(cls, recipe_path: str, ds_config_path: str, run_dir: Path, overrides: list[str],
               resume: bool, dist: Dist) -> "Trainer":
        recipe = load_recipe(recipe_path, overrides)
        ds_config = build_ds_config(recipe, load_engine_json(ds_config_path), dist.world_size)
        run = RunDir(run_dir)
        if dist.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            run.recipe_path.write_text(dump_recipe(recipe))
            run.ds_config_path.write_text(json.dumps(ds_config, indent=2))
        torch.manual_seed(recipe.train.seed)
        tokenizer = load_tokenizer(recipe.data.tokenizer)
        resuming = resume and run.latest() is not None
        # a resumed run's weights come from its checkpoint: no need for the init.vit/bert folders again
        build_recipe = dataclasses.replace(recipe, init=InitConfig()) if resuming else recipe
        task = build_task(recipe, tokenizer, DistInfo(dist.rank, dist.world_size),
                          build_model(build_recipe, recipe.train.seed))  # model + heads: what DeepSpeed wraps
        frozen = apply_freeze(task, recipe.freeze)
        if frozen:
            log.info("frozen %d parameters (%s)", len(frozen), ", ".join(recipe.freeze))
        # a checkpoint from pipeline.run.universal loads with checkpoint.load_universal (that load only)
        engine, _ = build_engine(task, recipe, universal_resume_config(run_dir, ds_config) if resuming else ds_config)
        torch.manual_seed(recipe.train.seed + 7919 * (dist.rank + 1))  # per-rank masking/negatives/noise
        # best of a few trials: a trial slowed by a busy host under-states the peak and inflates MFU. Measured
        # BEFORE the resume restores the RNG (its operands come from the global RNG): measuring after it gave a
        # resumed run other MLM masks and ITM negatives than the uninterrupted run
        peak = recipe.train.peak_tflops or max(
            measure_peak_tflops(dist.device, _dtype(ds_config)) for _ in range(PEAK_TRIALS))
        state = RunState(world_size=dist.world_size)
        saved = checkpoint.resume(engine, run_dir, dist) if resume else None
        if saved is not None:
            state = RunState(**{**saved, "resumes": _record_resume(run_dir, saved["step"], dist),
                                "world_size": dist.world_size})
        elif recipe.init_from:
            checkpoint.load_weights(engine, recipe.init_from)
        barrier()
        return cls(recipe, ds_config, run_dir, dist, engine, task, state, peak)

    def close(self) -> None:
        self.loader_iter = None  # shuts the DataLoader workers down now, not in interpreter teardown
        self.sink.close()

    # -------------------------------------------------------------------------------------- loop
    def fit(self) -> None:
        steps = self.recipe.train.steps
        if self.state.step >= steps:
            log.info("already trained %d/%d steps: nothing to do", self.state.step, steps)
            if not self.run.eval_path(RunDir.tag_for(self.state.step)).is_file():  # final eval failed
                self.evaluate()
            self._mark_finished()
            return
        self._install_signal_handlers()
        self._restart_data()
        log.info("training %s from step %d to %d on %d ranks (global batch %d)", self.recipe.task,
                 self.state.step, steps, self.dist.world_size, self.ds_config["train_batch_size"])
        while self.state.step < steps:
            self.train_step()
            step = self.state.step
            if step % self.recipe.train.log_every == 0 or step == steps:
                self.log_window()
            stop = self._stop_requested()
            if stop:
                log.info("%s: checkpointing at step %d and exiting", _signal_name(self.stop_signal), step)
            # save before evaluating: a failing evaluation never costs a checkpoint
            if stop or (step < steps and self.recipe.train.save_every and step % self.recipe.train.save_every == 0):
                self.save()
                if stop or self._stop_requested():  # a signal during this save: it is the checkpoint to stop at
                    log.info("preempted at step %d: checkpoint %s saved, rerun with --resume auto to continue",
                             step, RunDir.tag_for(step))
                    return
                self._restart_data()  # data stream is a function of (seed, step): resume is exact
            if step < steps and self.recipe.train.eval_every and step % self.recipe.train.eval_every == 0:
                self.evaluate()
        self.save()
        self.evaluate()
        self._mark_finished()

    def _mark_finished(self) -> None:
        if self.dist.is_main:  # what launch/pipeline.sh waits for before starting the next stage
            self.run.mark_finished(self.state.step)

    def train_step(self) -> None:
        """One optimizer step (``grad_accum`` micro-batches). A micro-batch whose loss is not finite on any
        rank is skipped on every rank (no backward, no update), as fp16 loss scaling skips overflowing
        steps; ``train.nonfinite_budget`` consecutive bad steps stop the run (``NonFiniteTraining``)."""
        engine, coef = self.engine, self.model_cfg.moe.aux_loss_coef
        moe_stats = engine.module.model.moe_stats  # every MoE call of the micro-batch's passes
        start = time.perf_counter()
        micro = 0
        while micro < self.recipe.batch.grad_accum:
            wait_start = time.perf_counter()
            batch = next(self.loader_iter)
            self.window.data_wait += time.perf_counter() - wait_start
            self._note_worker(batch)
            source = batch.get("__source__", 0)
            batch = to_device(strip_meta(batch), self.dist.device)
            moe_stats.reset()
            out = engine(batch)
            aux_loss = moe_stats.aux_loss(self.dist.device)
            loss = out.loss + coef * aux_loss
            if not self.guard.loss_ok(loss, self.state.step + 1):
                continue  # skipped on every rank: no backward, no update; the next batch takes its place
            engine.backward(loss)
            own_norm = self.guard.grad_norm() if engine.is_gradient_accumulation_boundary() else None
            engine.step()
            self._accumulate(out, aux_loss, moe_stats, batch, source)
            micro += 1
        engine.module.model.update_expert_bias()  # dropless, balance bias: once per optimizer step, all ranks
        norm = engine.get_global_grad_norm()
        norm = own_norm if norm is None else float(norm)
        self.guard.after_step(norm, self.state.step + 1)
        self.state.step += 1
        self.state.samples_seen += self.ds_config["train_batch_size"]
        self.window.add_step(time.perf_counter() - start, norm)

    def _accumulate(self, out: Any, aux_loss: torch.Tensor, moe_stats: Any, batch: dict[str, Any],
                    source: int) -> None:
        terms = {"loss": float(out.loss.detach()), "aux_loss": float(aux_loss.detach()),
                 **{key: float(value) for key, value in out.terms.items()}}
        self.window.add_micro(terms, source, _tokens_in(batch, self.model_cfg), moe_stats.routed, moe_stats.kept)

    def _note_worker(self, batch: dict[str, Any]) -> None:
        worker, skipped = batch.get("__worker__", (0, 0))
        self.worker_skips[worker] = skipped

    # ----------------------------------------------------------------------------------- logging
    def log_window(self) -> None:
        """Collective (all ranks): averages each loss term over the micro-batches (of all ranks) that reported
        it, sums expert counts, writes on rank 0 (with the share of each training source when several)."""
        w, device = self.window, self.dist.device
        if not w.steps:
            return
        values = w.term_means(device)
        routed, kept = ({key: all_reduce_sum(counts[key], device) for key in sorted(counts)}
                        for counts in (w.routed, w.kept))
        tokens = float(all_reduce_sum(torch.tensor([float(w.tokens)]), device)[0])
        skipped = float(all_reduce_sum(torch.tensor([float(sum(self.worker_skips.values()))]), device)[0])
        step_time = w.time / w.steps
        samples_per_s = self.ds_config["train_batch_size"] / step_time
        values.update({
            "train/lr": self.engine.get_lr()[0],
            "train/samples_per_s": samples_per_s, "train/tokens_per_s": tokens / w.time,
            "train/data_wait_frac": w.data_wait / w.time, "train/step_time_s": step_time,
            "data/skipped_samples": skipped, "train/samples_seen": float(self.state.samples_seen)})
        if w.norm_steps:
            values["train/grad_norm"] = w.grad_norm / w.norm_steps
        if self.flops_per_sample:
            values["train/mfu"] = (samples_per_s * self.flops_per_sample
                                   / (self.peak_tflops * 1e12 * self.dist.world_size))
            if values["train/mfu"] > 1 and not self.warned_mfu and self.dist.is_main:
                self.warned_mfu = True
                log.warning("MFU %.2f > 1: the peak measured at start-up (%.3g TFLOP/s per rank) is too low "
                            "(busy host?); set train.peak_tflops to the hardware's peak", values["train/mfu"],
                            self.peak_tflops)
        values.update(expert_load_scalars(routed, kept))
        num_sources = len(self.recipe.data.train)
        values.update(w.source_shares(num_sources))
        self.sink.scalars(values, self.state.step)
        if self.dist.is_main:
            log.info(console_line(self.state.step, self.recipe.train.steps, values,
                                  {i: w.sources[i] for i in range(num_sources)} if num_sources > 1 else None))
        self.window = TrainWindow()

    # ------------------------------------------------------------------------------ eval, ckpt
    def evaluate(self) -> dict[str, float]:
        """Collective. Runs under its own RNG stream (seeded from ``train.seed``), so evaluating never
        changes the training run's randomness (a resumed run matches an uninterrupted one whatever the
        eval interval) and two evaluations of the same weights give the same figures."""
        source = self.recipe.data.eval
        if source is None:
            return {}
        batch_size = self.recipe.batch.micro_batch_size
        with torch.random.fork_rng(devices=[self.dist.device] if self.dist.device.type == "cuda" else []):
            torch.manual_seed(self.recipe.train.seed + EVAL_SEED_OFFSET)
            loader = build_eval_loader(source, self.recipe.data, self.task, batch_size, self.dist.rank,
                                       self.dist.world_size)
            start = time.perf_counter()
            metrics, outputs = run_eval(self.engine, self.task, loader, self.dist, batch_size,
                                        self.recipe.train.eval_max_batches)
            metrics["eval_seconds"] = time.perf_counter() - start
            log_routing_images(self.engine.module, self.task, self.recipe, self.dist, self.sink, self.state.step)
        if self.dist.is_main:
            write_eval(self.run_dir, RunDir.tag_for(self.state.step), metrics, self.task, outputs)
            self.sink.scalars({f"eval/{k}": v for k, v in metrics.items()}, self.state.step)
            log.info("eval step %d: %s", self.state.step,
                     ", ".join(f"{k} {v:.4g}" for k, v in sorted(metrics.items())))
        return metrics

    def save(self) -> None:
        """Collective. Refuses to write non-finite weights (the last good checkpoint stays newest)."""
        if not self.guard.weights_finite():
            raise NonFiniteTraining(f"step {self.state.step}: non-finite weights; not saving a checkpoint "
                                    f"(the newest complete one in {self.run.checkpoints} is kept)")
        checkpoint.save_checkpoint(self.engine, self.run_dir, self.state.step, dataclasses.asdict(self.state),
                                   self.recipe.train.keep_last, self.dist)

    def _restart_data(self) -> None:
        self.state.data_seed = self.recipe.train.seed + DATA_SEED_STRIDE * self.state.step
        loader = build_train_loader(self.recipe.data, self.task, self.recipe.batch.micro_batch_size,
                                    self.dist.rank, self.state.data_seed)
        self.loader_iter = iter(loader)

    # ----------------------------------------------------------------------------------- signals
    def _install_signal_handlers(self) -> None:
        """SIGTERM, SIGUSR1 and SIGINT (Ctrl-C) ask for a checkpoint and exit at the next step boundary.
        pipeline.launch_guard starts the launcher with them blocked (so that the processes between it and
        the ranks ignore them): unblocked here, once handled; one sent meanwhile is delivered now. At exit
        they are ignored: interpreter teardown resets handlers to the default action, and a late one (the
        guard's SIGUSR1 after a group-wide signal, a second SIGTERM) would kill a rank that has finished."""
        def request_stop(signum: int, _frame: Any) -> None:
            if self.stop_signal is None:  # the first one names the cause (the guard's SIGUSR1 often follows)
                self.stop_signal = signum

        for sig in PREEMPTION_SIGNALS:
            signal.signal(sig, request_stop)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, PREEMPTION_SIGNALS)
        atexit.register(_ignore_stop_signals)
        watch_launcher()  # a launcher that dies (or is killed) makes this rank checkpoint and exit too

    def _stop_requested(self) -> bool:
        return all_reduce_max(1.0 if self.stop_signal is not None else 0.0, self.dist.device) > 0


def _record_resume(run_dir: Path, step: int, dist: Dist) -> int:
    """Append this resume to ``RUN/resumes.jsonl`` (rank 0) and return how many resumes the run has had,
    counting those that were interrupted again before their first save (a checkpoint's own count
    would miss them)."""
    path = RunDir(run_dir).resumes_path
    if dist.is_main:
        with path.open("a") as fh:
            fh.write(json.dumps({"time": time.time(), "from_step": step, "world_size": dist.world_size}) + "\n")
    barrier()
    return len(path.read_text().splitlines())


def _ignore_stop_signals() -> None:
    for sig in PREEMPTION_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def _signal_name(signum: int | None) -> str:
    return signal.Signals(signum).name if signum is not None else "stop requested by another rank"


def _tokens_in(batch: dict[str, Any], model_cfg: Any) -> int:
    """Input tokens of a micro-batch (``train/tokens_per_s``): real text tokens; per image its patches at the
    batch's image size and ``lead_tokens`` (CLS, summary tokens); per clip ``lead_tokens`` + the audio patches
    of its real frames (those the model does not mask: a patch that starts before ``audio_lengths``; every
    patch of the grid when the batch has no lengths)."""
    tokens = int(batch["attention_mask"].sum()) if "attention_mask" in batch else 0
    for key, pixels in batch.items():
        if key.startswith("pixel_values"):
            tokens += pixels.shape[0] * (model_cfg.lead_tokens + (pixels.shape[-1] // model_cfg.patch_size) ** 2)
    if "audio_values" in batch:
        tokens += _audio_tokens(batch["audio_values"], batch.get("audio_lengths"), model_cfg)
    return tokens


def _audio_tokens(features_btf: torch.Tensor, lengths_b: torch.Tensor | None, model_cfg: Any) -> int:
    audio_cfg, lead = model_cfg.audio, model_cfg.lead_tokens
    freq, time_patches = audio_cfg.grid(features_btf.shape[1])
    if lengths_b is None:
        return features_btf.shape[0] * (lead + freq * time_patches)
    starts_t = torch.arange(time_patches, device=lengths_b.device) * audio_cfg.stride_time
    real_time_b = (starts_t[None] < lengths_b[:, None]).sum(dim=1)
    return int((lead + freq * real_time_b).sum())


def _dtype(ds_config: dict[str, Any]) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision(ds_config)]


def _train_flops_per_sample(recipe: Any) -> float:
    """Forward + backward FLOPs of one training sample (``pipeline.plan``, from the model's accounting)."""
    from pipeline.plan import train_flops_per_sample

    return train_flops_per_sample(recipe)
