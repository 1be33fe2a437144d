"""`TrainConfig`: everything that defines one proxy training run (schedule, seed, model, optimiser,
learning-rate schedule, evaluation, checkpointing, averaging). Reads and writes no files."""

from __future__ import annotations

import dataclasses
import re
from typing import Literal

from framelm import launcher
from framelm.config import ConfigError, StageConfig, field
from framelm.model import ModelConfig


@dataclasses.dataclass
class TrainConfig(StageConfig):
    """Train a proxy model on RUN/export/<schedule>/stream, strictly in the schedule's order."""

    schedule: str = field("frame", help="exported schedule to train on: reads RUN/export/<schedule>/stream")
    seed: int = field(0, help="seed of the weight initialisation (and of the in-stage shuffle window)")
    model: ModelConfig = field(default_factory=ModelConfig, help="model shape: preset and overrides")
    seq_len: int = field(256, help="tokens per training sequence (row)")
    global_batch_seqs: int = field(16, help="sequences per optimizer step, summed over all ranks")
    micro_batch_seqs: int = field(0, hash=False, help="sequences per forward pass on one rank; smaller than the rank's share means gradient accumulation (0: the whole share at once)")
    max_tokens: int = field(0, help="training token budget, at most the stream length (0: the whole stream); steps = max_tokens // (global_batch_seqs * seq_len)")
    shuffle_window_seqs: int = field(0, help="shuffle sequences inside windows of this many consecutive sequences of one stage (0: strict stream order); never mixes stages")
    doc_masking: bool = field(True, help="block-diagonal attention: no token attends across an EOS boundary")
    attention: Literal["sdpa", "flex"] = field("sdpa", hash=False, help="kernel for document-masked attention: SDPA with a dense mask, or FlexAttention (block-sparse, compiled; trains on CUDA GPUs only)")
    lr: float = field(3e-3, help="peak learning rate")
    lr_schedule: Literal["cosine", "wsd", "constant"] = field("cosine", help="shape after warmup: cosine decay, warmup-stable-decay, or constant")
    warmup_fraction: float = field(0.05, help="fraction of steps with linear warmup from 0 to the peak")
    final_lr_ratio: float = field(0.1, help="final learning rate / peak (cosine and wsd)")
    wsd_decay_fraction: float = field(0.2, help="wsd: fraction of steps in the final decay phase")
    wsd_decay_shape: Literal["linear", "1-sqrt"] = field("1-sqrt", help="wsd: shape of the decay phase")
    weight_decay: float = field(0.1, help="AdamW decoupled weight decay (matrices only; not norms)")
    beta1: float = field(0.9, help="AdamW beta1")
    beta2: float = field(0.95, help="AdamW beta2")
    adam_eps: float = field(1e-8, help="AdamW epsilon")
    grad_clip: float = field(1.0, help="clip the global gradient norm to this (0: no clipping)")
    eval_every_steps: int = field(50, help="held-out loss every this many steps and at the end (0: only at the end)")
    heldout_max_tokens_per_set: int = field(50_000, help="tokens per held-out set (all, per source, per quadrant); 0 turns held-out evaluation off (no heldout records in log.jsonl)")
    checkpoint_every_steps: int = field(100, help="write a checkpoint every this many steps (and at the end); only the "
                                        "newest is kept, or the last average_last with average set")
    average: Literal["none", "ema", "sma", "wma"] = field("none", help="average the last checkpoints into hf-avg/: exponential, simple or linearly weighted moving average")
    average_last: int = field(5, help="how many of the last checkpoints to average")
    ema_decay: float = field(0.5, help="ema: weight of the running average when folding in the next checkpoint")
    precision: Literal["auto", "fp32", "bf16"] = field("auto", help="autocast dtype: auto = bf16 on CUDA, fp32 on CPU")
    device: str = field("auto", hash=False, help="auto, cpu, cuda or cuda:N (under torchrun each rank uses cuda:LOCAL_RANK)")
    compile: bool = field(False, hash=False, help="torch.compile each transformer block and the loss (seconds to compile; faster steps on GPUs)")
    log_every_steps: int = field(1, hash=False, help="write a train record every this many steps")
    peak_tflops: float = field(0.0, hash=False, help="peak TFLOP/s of one device for MFU (0: looked up for known GPUs; unknown -> mfu null)")
    tensorboard: bool = field(False, hash=False, help="also write TensorBoard event files under tensorboard/")

    def instance(self) -> str:
        return f"{self.schedule}/seed{self.seed}"

    def upstream(self) -> tuple[str, ...]:
        # the one schedule's part of the export: exporting another schedule keeps this run up to date
        return (f"export#{self.schedule}",)

    @property
    def world_size(self) -> int:
        """The processes torchrun started; the stage runner treats a folder they share with care."""
        return launcher.world_size()

    def lock_name(self, key: str) -> str:
        """Under torchrun every rank runs the stage, so each takes its own lock."""
        return f"{key}/rank{launcher.rank()}" if self.world_size > 1 else key

    def validate(self) -> None:
        if not self.schedule or "/" in self.schedule or self.schedule.startswith("."):
            raise ConfigError(f"'schedule' = {self.schedule!r} must be a schedule name such as 'frame' (no slashes)")
        positive = ("seq_len", "global_batch_seqs", "checkpoint_every_steps", "average_last", "log_every_steps")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"'{name}' = {getattr(self, name)} must be at least 1")
        for name in ("micro_batch_seqs", "max_tokens", "shuffle_window_seqs", "eval_every_steps", "heldout_max_tokens_per_set",
                     "grad_clip", "weight_decay", "peak_tflops"):
            if getattr(self, name) < 0:
                raise ConfigError(f"'{name}' = {getattr(self, name)} must not be negative")
        if self.lr <= 0:
            raise ConfigError(f"'lr' = {self.lr} must be positive")
        for name in ("warmup_fraction", "final_lr_ratio", "wsd_decay_fraction", "ema_decay"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"'{name}' = {getattr(self, name)} must lie in [0, 1]")
        if self.lr_schedule == "wsd" and self.warmup_fraction + self.wsd_decay_fraction > 1.0:
            raise ConfigError(f"'warmup_fraction' + 'wsd_decay_fraction' = {self.warmup_fraction + self.wsd_decay_fraction} must not exceed 1")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"'{name}' = {getattr(self, name)} must lie in [0, 1)")
        if self.micro_batch_seqs and self.global_batch_seqs % self.micro_batch_seqs:
            raise ConfigError(f"'micro_batch_seqs' = {self.micro_batch_seqs} must divide 'global_batch_seqs' = {self.global_batch_seqs}")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ConfigError(f"'device' = {self.device!r}: use auto, cpu, cuda or cuda:N")
        self.model.validate()
