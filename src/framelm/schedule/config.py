"""The schedule stage's settings: ScheduleConfig, its list of StrategyConfig, and the check of a
{name: weight} mixture that strategies and schedule files share."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from framelm import fsutil
from framelm.config import StageConfig, field
from framelm.errors import ConfigError


@dataclass
class StrategyConfig(StageConfig):
    kind: Literal["frame", "random", "permutation", "ppl_two_stage", "pd_two_stage", "sorted", "two_phase", "yaml"] = field(
        "frame", help="frame: Q3->Q4->Q1->Q2; random: same documents shuffled; permutation: cells in `order`; "
                      "ppl_two_stage: high then low PPL; pd_two_stage: low then high PD; sorted: by `column`; "
                      "two_phase: per-source blends per phase; yaml: a schedule file (`path`)")
    name: str = field("", help="output folder RUN/schedule/<name>; default: the kind")
    order: list[str] = field(default_factory=list, help="permutation: every cell name once, in stage order, e.g. [Q2, Q1, Q4, Q3]")
    cells: list[str] = field(
        default_factory=list, help="keep only the documents of these partition cells (perplexity-band selection), e.g. "
                                   "[P1D0, P1D1] for the middle PPL band of ppl_quantiles [0.1, 0.9]; the schedule still "
                                   "holds total_tokens (by default one pass over all training documents), repeating the "
                                   "kept documents as needed; default: every cell (frame, random, permutation, "
                                   "*_two_stage, sorted)")
    column: str = field("ppl", help="sorted: the numeric column of score/scores.parquet to sort by "
                                    "(ppl, pd, n_tokens, ppl_weak, bpb_strong, ...)")
    descending: bool = field(False, help="sorted: largest value first")
    n_stages: int = field(1, help="sorted: cut the sorted stream into this many equal-token stages")
    phase_split: list[float] = field(default_factory=lambda: [0.6, 0.4], help="two_phase: token share of each phase (sums to 1)")
    blends: list[dict[str, float]] = field(
        default_factory=list, help="two_phase: one blend per phase, {source or tier: token weight} summing to 1; "
                                   "a tier's weight is split over its sources by their tokens")
    tiers: dict[str, str] = field(default_factory=dict, help="two_phase: quality tier of each source, e.g. {math: high, forum: low}")
    design_tokens: int | None = field(
        None, help="two_phase: the horizon (tokens) the blends were designed for; each source is downsampled "
                   "to total/design of its tokens so that its epoch count is the designed one")
    path: str = field("", help="yaml: the schedule file")
    epoch_caps: dict[str, float] = field(default_factory=dict, help="most epochs allowed per source (overrides max_epochs)")

    @property
    def label(self) -> str:
        return self.name or self.kind

    def validate(self) -> None:
        if self.name and (not self.name.replace("_", "").replace("-", "").isalnum()):
            raise ConfigError(f"'name' = {self.name!r}: use letters, digits, '-' and '_' only (it names a folder)")
        if self.cells and self.kind in ("two_phase", "yaml"):
            raise ConfigError(f"'cells' selects partition cells for frame, random, permutation, ppl_two_stage, pd_two_stage "
                              f"and sorted; a {self.kind} strategy draws from sources"
                              + (" (a yaml schedule selects cells through its stages' mix)" if self.kind == "yaml" else ""))
        dupes = sorted({c for c in self.cells if self.cells.count(c) > 1})
        if dupes:
            raise ConfigError(f"'cells' names {dupes[0]!r} twice")
        if self.kind == "permutation" and not self.order:
            raise ConfigError("a permutation strategy needs 'order', e.g. order: [Q2, Q1, Q4, Q3]")
        if self.kind == "sorted":
            if self.n_stages < 1:
                raise ConfigError(f"'n_stages' must be >= 1, got {self.n_stages}")
        if self.kind == "two_phase":
            if not self.phase_split or any(s <= 0 for s in self.phase_split) or abs(sum(self.phase_split) - 1) > 1e-6:
                raise ConfigError(f"'phase_split' = {self.phase_split}: positive shares summing to 1, e.g. [0.6, 0.4]")
            if len(self.blends) != len(self.phase_split):
                raise ConfigError(f"'blends' has {len(self.blends)} blend(s) for {len(self.phase_split)} phases; give one "
                                  f"{{source: weight}} mapping per phase, e.g. [{{web: 0.8, math: 0.2}}, {{web: 0.5, math: 0.5}}]")
            for p, blend in enumerate(self.blends):
                check_weights(blend, f"blends[{p}]")
            if self.design_tokens is not None and self.design_tokens <= 0:
                raise ConfigError(f"'design_tokens' must be positive, got {self.design_tokens}")
        if self.kind == "yaml" and not self.path:
            raise ConfigError("a yaml strategy needs 'path', the schedule file")
        for source, cap in self.epoch_caps.items():
            if cap <= 0:
                raise ConfigError(f"'epoch_caps.{source}' must be positive, got {cap}")


def _default_strategies() -> list[StrategyConfig]:
    return [StrategyConfig(kind="frame"), StrategyConfig(kind="random")]


@dataclass
class ScheduleConfig(StageConfig):
    strategies: list[StrategyConfig] = field(default_factory=_default_strategies, help="the schedules to build (set with --set or a config file)")
    total_tokens: int | None = field(None, help="tokens in each schedule (EOS included); default: one pass over the training documents")
    seq_len: int = field(1024, help="training sequence length in tokens (for the optimizer-step ranges)")
    global_batch: int = field(32, help="sequences per optimizer step; tokens per step = global_batch * seq_len")
    seed: int = field(0, help="seed of every sampling and shuffling decision")
    transition: Literal["hard", "linear", "logistic"] = field("logistic", help="how the next stage's share rises at a boundary")
    transition_window: float = field(0.1, help="window of a transition, as a fraction of the smaller neighbouring stage's tokens")
    logistic_steepness: float = field(10.0, help="slope of the logistic S-curve over the window (larger: closer to hard)")
    max_epochs: float | None = field(None, help="most epochs any source may be repeated (None: no cap)")
    weight_tolerance: float = field(1e-3, help="how far the mixture weights and stage shares of a yaml schedule may sum from 1")
    threads: int = field(2, help="threads that permute pools and gather ids while order.parquet is written", hash=False)

    def validate(self) -> None:
        if not self.strategies:
            raise ConfigError("'strategies' is empty; give at least one, e.g. [{kind: frame}, {kind: random}]")
        labels = [s.label for s in self.strategies]
        dupes = sorted({x for x in labels if labels.count(x) > 1})
        if dupes:
            raise ConfigError(f"'strategies': two schedules are named {dupes[0]!r}; give each a distinct 'name'")
        if self.total_tokens is not None and self.total_tokens <= 0:
            raise ConfigError(f"'total_tokens' must be positive, got {self.total_tokens}")
        for key in ("seq_len", "global_batch"):
            if getattr(self, key) < 1:
                raise ConfigError(f"'{key}' must be >= 1, got {getattr(self, key)}")
        if not 0 <= self.transition_window <= 1:
            raise ConfigError(f"'transition_window' must be in [0, 1], got {self.transition_window}")
        if self.logistic_steepness <= 0:
            raise ConfigError(f"'logistic_steepness' must be positive, got {self.logistic_steepness}")
        if self.max_epochs is not None and self.max_epochs <= 0:
            raise ConfigError(f"'max_epochs' must be positive, got {self.max_epochs}")
        if self.threads < 1:
            raise ConfigError(f"'threads' must be >= 1, got {self.threads}")

    def hashed_dict(self) -> dict[str, Any]:
        # A yaml strategy's result depends on its file's content, not only on its path.
        data = super().hashed_dict()
        for entry, strategy in zip(data["strategies"], self.strategies):
            if not strategy.cells:
                del entry["cells"]  # every cell, as before `cells` existed: a run made then stays up to date
            if strategy.kind == "yaml" and Path(strategy.path).is_file():
                entry["path_sha256"] = fsutil.sha256_file(strategy.path)
        return data


def check_weights(weights: dict[str, float], where: str, tolerance: float = 1e-3) -> None:
    if not weights:
        raise ConfigError(f"{where}: empty mixture; give {{name: weight}} pairs summing to 1")
    bad = {k: w for k, w in weights.items() if not isinstance(w, (int, float)) or isinstance(w, bool) or not math.isfinite(w) or w < 0}
    if bad:
        k = next(iter(bad))
        raise ConfigError(f"{where}.{k}: weight {bad[k]!r} must be a finite number >= 0")
    total = float(sum(weights.values()))
    if abs(total - 1) > tolerance:
        raise ConfigError(f"{where}: weights sum to {total:.6g}, not 1 (tolerance {tolerance:g}): {weights}")
