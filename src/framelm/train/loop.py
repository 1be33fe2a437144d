"""The training loop: model, data plan, optimizer, schedule, logging, checkpoints, export.

`fit` trains on any token stream with stage ranges and writes, under OUT:

    OUT/log.jsonl        {"type": "train", "step", "tokens", "loss", "lr", "stage", "tokens_per_s", "mfu"}
                         per logged step and {"type": "heldout", "step", "tokens", "losses": {set: nats/token},
                         "bpb": {set: bits/byte}} every eval_every_steps steps and at the end
    OUT/checkpoints/     see framelm.train.checkpoint
    OUT/hf/              the final model in Hugging Face format (or `hf_dir`)
    OUT/hf-avg/          the average of the last checkpoints (when cfg.average is not "none")
    OUT/tensorboard/     optional event files

`train_model` is the `train` stage: it reads RUN/export/<schedule>/stream and the held-out
sets of RUN/tokenize, and calls `fit` with OUT = RUN/train/<schedule>/seed<k>.

Re-running a killed run resumes from its newest checkpoint: the log is cut back to that step,
and because batches and learning rates are functions of the step alone, the losses that follow
equal those of an uninterrupted run (bit for bit on CPU). Only rank 0 writes files, and every
rank resumes from what it finds, so under torchrun OUT must be on a filesystem all ranks share
(ranks that find different newest checkpoints refuse to start).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from framelm import fsutil
from framelm.errors import FramelmError, require_module
from framelm.heldout import HeldoutSet, heldout_loss, heldout_sets
from framelm.model import FrameLM, count_params, flops_per_token, next_token_loss
from framelm.progress import progress_bar
from framelm.rundir import RunDir
from framelm.tokenstore import StageRange, check_stages
from framelm.train import checkpoint as ckpt
from framelm.train.averaging import average_checkpoints
from framelm.train.config import TrainConfig
from framelm.train.data import BatchPlan, read_stream, stream_fingerprint
from framelm.train.distributed import World, all_ranks_min_max, all_reduce_mean, barrier, init_world, shutdown
from framelm.hf_llama import export_hf
from framelm.train.lr import lr_at

log = logging.getLogger("framelm")

# Dense bf16 peak FLOP/s of one device, by a substring of torch.cuda.get_device_name().
GPU_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L40": 181e12, "A10G": 70e12,
                  "L4": 121e12, "4090": 165e12}


def gpu_peak_flops(device_name: str) -> float | None:
    """Peak FLOP/s of a GPU by its name, None if unknown. The longest matching key wins, since
    shorter ones are substrings of other names ("L4" of "NVIDIA L40")."""
    matches = [key for key in GPU_PEAK_FLOPS if key in device_name]
    return GPU_PEAK_FLOPS[max(matches, key=len)] if matches else None


def peak_flops(device: torch.device, peak_tflops: float = 0.0) -> float | None:
    """Peak FLOP/s of one `device` for MFU: `peak_tflops` when given, else looked up for known GPUs."""
    if peak_tflops:
        return peak_tflops * 1e12
    if device.type == "cuda":
        return gpu_peak_flops(torch.cuda.get_device_name(device))
    return None


class LogFile:
    """log.jsonl, appended line by line; on resume, cut back to the records of finished steps."""

    def __init__(self, path: Path, resume_step: int, enabled: bool):
        self.path, self.enabled = path, enabled
        self.records: list[dict[str, Any]] = []
        if not enabled:
            return
        if path.is_file():
            # a killed run's cut-off last line is dropped; a bad line before it is an error, not the
            # silent loss of every record after it
            self.records = [r for _, r in fsutil.read_log(path) if r.get("step", 0) <= resume_step]
        fsutil.write_text(path, "".join(json.dumps(r) + "\n" for r in self.records))
        self._fh = open(path, "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            self.records.append(record)
            self._fh.write(json.dumps(record) + "\n")
            self._fh.flush()

    def last(self, kind: str) -> dict[str, Any] | None:
        return next((r for r in reversed(self.records) if r.get("type") == kind), None)

    def close(self) -> None:
        if self.enabled:
            self._fh.close()


def build_optimizer(model: FrameLM, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only; the fused kernel where the device has one."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps,
                             fused=device.type == "cuda")


def fit(cfg: TrainConfig, tokens: np.ndarray, stages: list[StageRange], out_dir: Path, *, eos_id: int,
        vocab_size: int, heldout: dict[str, HeldoutSet] | None = None, tokenizer_dir: Path | None = None,
        hf_dir: Path | None = None) -> dict[str, Any]:
    """Train on `tokens` (stages tile it in order); write log, checkpoints and HF model under `out_dir`."""
    cfg.validate()
    check_stages(stages, len(tokens), "training stream")
    world = init_world(cfg.device)
    try:
        return _Trainer(cfg, tokens, stages, Path(out_dir), eos_id, vocab_size, heldout or {}, tokenizer_dir,
                        Path(hf_dir) if hf_dir else Path(out_dir) / "hf", world).run()
    finally:
        shutdown(world)


class _Trainer:
    def __init__(self, cfg, tokens, stages, out_dir, eos_id, vocab_size, heldout, tokenizer_dir, hf_dir, world: World):
        self.cfg, self.out_dir, self.eos_id, self.world = cfg, out_dir, eos_id, world
        self.heldout, self.tokenizer_dir, self.hf_dir = heldout, tokenizer_dir, hf_dir
        self.plan = BatchPlan(tokens, stages, cfg.seq_len, cfg.global_batch_seqs, cfg.max_tokens,
                              cfg.shuffle_window_seqs, cfg.seed)
        if cfg.global_batch_seqs % world.size:
            raise FramelmError(f"global_batch_seqs = {cfg.global_batch_seqs} must be divisible by the number of ranks ({world.size})")
        self.local_rows = cfg.global_batch_seqs // world.size
        self.micro_rows = min(cfg.micro_batch_seqs or self.local_rows, self.local_rows)
        if self.local_rows % self.micro_rows:
            raise FramelmError(f"micro_batch_seqs = {self.micro_rows} must divide each rank's {self.local_rows} sequences per step")
        self.args = cfg.model.resolve(vocab_size)
        if cfg.seq_len > self.args.max_seq_len:
            raise FramelmError(f"seq_len = {cfg.seq_len} exceeds the model's max_seq_len = {self.args.max_seq_len}; set model.max_seq_len")
        if self.args.vocab_size < vocab_size:
            raise FramelmError(f"model.vocab_size = {self.args.vocab_size} is smaller than the tokenizer's {vocab_size}")
        largest = int(tokens.max()) if len(tokens) else 0
        if largest >= self.args.vocab_size:
            raise FramelmError(f"the token stream holds token id {largest}, outside the vocabulary of {self.args.vocab_size}; "
                               f"its meta.json vocab_size is wrong or the stream was made with another tokenizer")
        if cfg.doc_masking and cfg.attention == "flex" and world.device.type != "cuda":
            raise FramelmError(f"attention = 'flex' trains only on CUDA GPUs (FlexAttention has no backward pass on "
                               f"{world.device.type} in torch {torch.__version__}); use attention = 'sdpa' there")
        self.fingerprint = stream_fingerprint(tokens, stages)
        self.bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and world.device.type == "cuda")
        self.ckpt_root = out_dir / "checkpoints"

    def autocast(self):
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.world.device.type, dtype=torch.bfloat16)

    def run(self) -> dict[str, Any]:
        cfg, world, plan = self.cfg, self.world, self.plan
        torch.manual_seed(cfg.seed)
        model = FrameLM(self.args, cfg.attention)  # initialised on the CPU: the same weights on every device
        model.to(world.device)
        optimizer = build_optimizer(model, cfg, world.device)
        start_step = self._resume(model, optimizer)
        logfile = LogFile(self.out_dir / "log.jsonl", start_step, world.is_main)
        writer = self._tensorboard() if world.is_main and cfg.tensorboard else None
        forward_model, loss_fn = model, next_token_loss
        if cfg.compile:
            model.compile_blocks()
            # Compiled, the fp32 upcast of the (B, T, vocab) logits fuses into the cross-entropy
            # instead of being written out in full.
            loss_fn = torch.compile(next_token_loss)
        if world.distributed:
            from torch.nn.parallel import DistributedDataParallel

            forward_model = DistributedDataParallel(forward_model, device_ids=[world.device.index] if world.device.type == "cuda" else None)
        mask_eos = self.eos_id if cfg.doc_masking else None
        accum = self.local_rows // self.micro_rows
        peak = peak_flops(world.device, cfg.peak_tflops)
        flops = flops_per_token(self.args, cfg.seq_len)
        with progress_bar(total=plan.n_steps, initial=start_step, desc=f"train {self.out_dir.name}", unit="step",
                          disable=not world.is_main) as progress:
            for step in range(start_step, plan.n_steps):
                started = time.perf_counter()
                lr = lr_at(step, plan.n_steps, cfg.lr, cfg.lr_schedule, cfg.warmup_fraction, cfg.final_lr_ratio,
                           cfg.wsd_decay_fraction, cfg.wsd_decay_shape)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                step_loss = torch.zeros((), device=world.device)
                for micro in range(accum):
                    first = world.rank * self.local_rows + micro * self.micro_rows
                    inputs, targets = plan.rows(step, first, self.micro_rows)
                    x = torch.from_numpy(inputs).to(world.device, non_blocking=True)
                    y = torch.from_numpy(targets).to(world.device, non_blocking=True)
                    # Gradients are all-reduced only on the last micro-batch of the step.
                    last = micro == accum - 1 or not world.distributed
                    sync = contextlib.nullcontext() if last else forward_model.no_sync()
                    with sync:
                        with self.autocast():
                            loss = loss_fn(forward_model(x, mask_eos), y) / accum
                        loss.backward()
                    step_loss += loss.detach()
                if cfg.grad_clip:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                loss_value = float(all_reduce_mean(step_loss, world))  # .item() also waits for the GPU
                seconds = time.perf_counter() - started
                done = step + 1
                tokens_done = done * plan.tokens_per_step
                tokens_per_s = plan.tokens_per_step / seconds
                if not math.isfinite(loss_value):
                    raise FramelmError(f"training loss became {loss_value} at step {done}; lower lr (now {cfg.lr}) "
                                       "or raise warmup_fraction")
                if done % cfg.log_every_steps == 0 or done == plan.n_steps:
                    record = {"type": "train", "step": done, "tokens": tokens_done, "loss": loss_value, "lr": lr,
                              "stage": plan.stage_of_step(step), "tokens_per_s": round(tokens_per_s, 1),
                              "mfu": round(flops * tokens_per_s / (peak * world.size), 5) if peak else None}
                    logfile.write(record)
                    if writer:
                        writer.add_scalar("train/loss", loss_value, tokens_done)
                        writer.add_scalar("train/lr", lr, tokens_done)
                progress.update(1)
                progress.set_postfix(loss=f"{loss_value:.3f}", stage=plan.stage_of_step(step))
                if (cfg.eval_every_steps and done % cfg.eval_every_steps == 0) or done == plan.n_steps:
                    self._evaluate(model, done, logfile, writer)
                if done % cfg.checkpoint_every_steps == 0 or done == plan.n_steps:
                    self._save(model, optimizer, done, lr)
        if writer:
            writer.close()
        counts = self._finish(model, logfile)
        logfile.close()
        return counts

    # -- pieces ------------------------------------------------------------------------------
    def _state(self, step: int, lr: float) -> dict[str, Any]:
        # The scheduler and the data position are functions of the step; they are recorded for
        # people reading the checkpoint, and the fingerprint ties it to its stream.
        return {"step": step, "tokens": step * self.plan.tokens_per_step, "n_steps": self.plan.n_steps,
                "rows_consumed": step * self.plan.rows_per_step, "last_lr": lr, "lr_schedule": self.cfg.lr_schedule,
                "stream_fingerprint": self.fingerprint, "config_hash": self.cfg.config_hash(),
                "world_size": self.world.size}

    def _resume(self, model: FrameLM, optimizer: torch.optim.Optimizer) -> int:
        found = ckpt.checkpoint_dirs(self.ckpt_root)
        # Every rank looks on its own; on nodes that do not share the run folder they would
        # resume from different steps (or some from scratch) and then hang or diverge.
        lowest, highest = all_ranks_min_max(ckpt.checkpoint_step(found[-1]) if found else 0, self.world)
        if lowest != highest:
            raise FramelmError(
                f"the ranks see different newest checkpoints under {self.ckpt_root} (from step {lowest} to step {highest}; "
                f"0 = none); resuming under torchrun needs {self.out_dir} on a filesystem shared by all ranks")
        if not found:
            return 0
        latest = found[-1]
        model_state, trainer_state, state = ckpt.load_checkpoint(latest)
        if state.get("stream_fingerprint") != self.fingerprint:
            raise FramelmError(
                f"{latest} was written while training on another token stream (fingerprint {state.get('stream_fingerprint')}, "
                f"now {self.fingerprint}); refusing to resume. Delete {self.out_dir} (or run with --force) to start over")
        if state.get("config_hash") != self.cfg.config_hash():
            raise FramelmError(f"{latest} was written with another training config; refusing to resume. Delete {self.out_dir} (or run with --force) to start over")
        model.load_weights(model_state)
        optimizer.load_state_dict(trainer_state["optimizer"])
        torch.set_rng_state(trainer_state["torch_rng"])
        if "cuda_rng" in trainer_state and self.world.device.type == "cuda":
            torch.cuda.set_rng_state(trainer_state["cuda_rng"], self.world.device)
        log.info("resuming %s from step %d", self.out_dir, state["step"])
        return int(state["step"])

    def _save(self, model: FrameLM, optimizer: torch.optim.Optimizer, step: int, lr: float) -> None:
        if self.world.is_main:
            trainer_state = {"optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state()}
            if self.world.device.type == "cuda":
                trainer_state["cuda_rng"] = torch.cuda.get_rng_state(self.world.device)
            keep = self.cfg.average_last if self.cfg.average != "none" else 1
            ckpt.save_checkpoint(self.ckpt_root, step, model.weights(), trainer_state, self._state(step, lr), keep)
        barrier(self.world)

    def _evaluate(self, model: FrameLM, step: int, logfile: LogFile, writer) -> None:
        if self.world.is_main and self.heldout:
            losses, bpb = {}, {}
            with self.autocast():
                for name, hset in self.heldout.items():
                    result = heldout_loss(model, hset, self.eos_id, self.cfg.seq_len, self.micro_rows, self.world.device)
                    losses[name], bpb[name] = result["loss"], result["bpb"]
            logfile.write({"type": "heldout", "step": step, "tokens": step * self.plan.tokens_per_step,
                           "losses": losses, "bpb": bpb})
            if writer:
                for name, value in losses.items():
                    writer.add_scalar(f"heldout/{name}", value, step * self.plan.tokens_per_step)
        barrier(self.world)

    def _tensorboard(self):
        tb = require_module("torch.utils.tensorboard", "tensorboard", "tensorboard = true")
        return tb.SummaryWriter(str(self.out_dir / "tensorboard"))

    def _finish(self, model: FrameLM, logfile: LogFile) -> dict[str, Any]:
        counts: dict[str, Any] = {"steps": self.plan.n_steps, "tokens": self.plan.n_steps * self.plan.tokens_per_step,
                                  "params": count_params(self.args), "params_non_embedding": count_params(self.args, False)}
        if not self.world.is_main:
            return {**counts, "_pending": True}
        export_hf(model.weights(), self.args, self.hf_dir, self.eos_id, self.tokenizer_dir)
        if self.cfg.average != "none":
            last = ckpt.checkpoint_dirs(self.ckpt_root)[-self.cfg.average_last:]
            averaged = average_checkpoints([p / "model.safetensors" for p in last], self.cfg.average, self.cfg.ema_decay)
            export_hf(averaged, self.args, self.out_dir / "hf-avg", self.eos_id, self.tokenizer_dir)
            counts["averaged_checkpoints"] = len(last)
        train_record, heldout_record = logfile.last("train"), logfile.last("heldout")
        if train_record:
            counts["final_train_loss"] = train_record["loss"]
        if heldout_record and "all" in heldout_record["losses"]:
            counts["final_heldout_loss"] = heldout_record["losses"]["all"]
        return counts


def train_model(cfg: TrainConfig, run: RunDir) -> dict[str, Any]:
    """The `train` stage: train on RUN/export/<schedule>/stream, write RUN/train/<schedule>/seed<k>/."""
    stream_dir = run.path("export", cfg.schedule, "stream")
    if not stream_dir.is_dir():
        exported = sorted(p.name for p in run.path("export").iterdir() if (p / "stream").is_dir()) if run.path("export").is_dir() else []
        raise FramelmError(f"no exported stream for schedule '{cfg.schedule}' at {stream_dir}; exported schedules: {exported or 'none'}")
    tokens, stages, meta = read_stream(stream_dir)
    heldout = {}
    if cfg.heldout_max_tokens_per_set and run.path("tokenize", "index.parquet").is_file():
        heldout = heldout_sets(run, cfg.heldout_max_tokens_per_set)
    tokenizer_dir = run.path("tokenize", "tokenizer")
    return fit(cfg, tokens, stages, run.path("train", cfg.instance()), eos_id=int(meta["eos_id"]),
               vocab_size=int(meta["vocab_size"]), heldout=heldout,
               tokenizer_dir=tokenizer_dir if tokenizer_dir.is_dir() else None)
