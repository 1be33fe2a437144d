"""The strategies: Builder turns the corpus and a StrategyConfig into a Schedule, a list of
Stages, each the documents (with epochs and tokens) of one stage in stream order; and
read_yaml_schedule reads the file of a `yaml` strategy."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from framelm.columnar import code_counts, code_totals, index_dtype
from framelm.config import load_yaml
from framelm.errors import ConfigError, FramelmError
from framelm.schedule.config import ScheduleConfig, StrategyConfig, check_weights
from framelm.schedule.corpus import Corpus
from framelm.schedule.pools import Draw, PoolStream, concat_draws, key_seed, permute_first_epochs, shuffled

log = logging.getLogger("framelm")


@dataclass
class Stage:
    name: str
    idx: np.ndarray  # row indices into the corpus, in stream order
    epoch: np.ndarray
    weight: np.ndarray  # each document's tokens (corpus.weight[idx]), carried so nothing gathers them again


@dataclass
class Schedule:
    name: str
    kind: str
    stages: list[Stage]
    smooth: bool  # whether transitions apply between these stages
    pool_tokens: dict[str, int]  # per source: unique tokens the schedule draws from
    cells: list[str] = dataclasses.field(default_factory=list)  # the cells a selection keeps; empty: every cell


def _shuffle(seed: int, key: str, idx: np.ndarray, epoch: np.ndarray, weight: np.ndarray) -> Stage:
    rng = np.random.default_rng([seed, key_seed(key)])
    if epoch.strides == (0,):  # one epoch number for all, as a broadcast view: nothing to move
        idx, weight = shuffled(rng, idx, weight)
        return Stage(key, idx, epoch, weight)
    return Stage(key, *shuffled(rng, idx, epoch, weight))


MEMBER_SLICE_ROWS = 1 << 22


class Builder:
    """Builds one schedule in memory from a corpus and the stage config."""

    def __init__(self, corpus: Corpus, cfg: ScheduleConfig):
        self.corpus, self.cfg = corpus, cfg
        self.weight = corpus.weight
        self.data_tokens = int(self.weight.sum())
        self.total = float(cfg.total_tokens if cfg.total_tokens is not None else self.data_tokens)
        # documents and tokens per (cell, source), in one pass over the corpus
        docs, tokens = code_totals(corpus.pair, self.weight, len(corpus.cell_names) * len(corpus.source_names))
        self.pair_docs = docs.reshape(len(corpus.cell_names), len(corpus.source_names))
        self.pair_tokens = tokens.reshape(self.pair_docs.shape)
        self.source_tokens, self.cell_tokens = self.pair_tokens.sum(axis=0), self.pair_tokens.sum(axis=1)

    # pools
    @staticmethod
    def _members(codes: np.ndarray, n_codes: int) -> list[np.ndarray]:
        """Row indices holding each code 0..n_codes-1, ascending."""
        dtype = index_dtype(len(codes))
        if n_codes <= 16:
            # A pass per code beats a sort while the codes are few. Counted first and filled a
            # slice at a time, so that no index array exists twice or in 64 bits.
            members, filled = [np.empty(int(c), dtype) for c in code_counts(codes, n_codes)], [0] * n_codes
            for sl in (slice(lo, lo + MEMBER_SLICE_ROWS) for lo in range(0, len(codes), MEMBER_SLICE_ROWS)):
                part = codes[sl]
                for c in range(n_codes):
                    idx = np.flatnonzero(part == c)
                    np.add(idx, sl.start, out=members[c][filled[c]:filled[c] + len(idx)], casting="unsafe")
                    filled[c] += len(idx)
            return members
        if n_codes < np.iinfo(np.int16).max:
            codes = codes.astype(np.int16)  # numpy's stable sort is a linear-time radix sort at 16 bits
        order = np.argsort(codes, kind="stable").astype(dtype)
        bounds = np.searchsorted(codes[order], np.arange(n_codes + 1))
        return [order[bounds[i]:bounds[i + 1]] for i in range(n_codes)]

    def cell_streams(self, kept: np.ndarray | None = None) -> dict[str, PoolStream]:
        """One stream per cell (or per cell of `kept`, row numbers); each is seeded by its own name,
        so a cell's documents come in the same order whichever others are kept."""
        members = self._members(self.corpus.cell, len(self.corpus.cell_names))
        rows = range(len(self.corpus.cell_names)) if kept is None else kept
        streams = {self.corpus.cell_names[i]: PoolStream(f"cell:{self.corpus.cell_names[i]}", members[i], self.weight, self.cfg.seed)
                   for i in rows}
        permute_first_epochs(list(streams.values()), self.cfg.threads)
        return streams

    def source_streams(self, fraction: float = 1.0) -> dict[str, PoolStream]:
        """One stream per source; fraction < 1 first downsamples each source (seeded) to that share of
        its tokens, to one document at least."""
        members = self._members(self.corpus.source, len(self.corpus.source_names))
        streams = {}
        for i, name in enumerate(self.corpus.source_names):
            pool = members[i]
            if fraction < 1:
                sample = PoolStream(f"subsample:{name}", pool, self.weight, self.cfg.seed)
                pool = sample.take(fraction * self.source_tokens[i])[0]
                if not len(pool):
                    # The target is under half the first sampled document: keep that document, which
                    # the budget then repeats (fewer epochs than designed), rather than lose the source.
                    pool = sample.permute(0)[0][:1]
                pool = np.sort(pool)
            streams[name] = PoolStream(f"source:{name}", pool, self.weight, self.cfg.seed)
        permute_first_epochs(list(streams.values()), self.cfg.threads)
        return streams

    def _check_caps(self, strategy: StrategyConfig, needed: dict[str, tuple[float, str]]) -> None:
        """needed: source -> (epochs its budget needs, what drives it). Raise if a cap is exceeded."""
        unknown = [s for s in strategy.epoch_caps if s not in self.corpus.source_names]
        if unknown:
            where = f"strategy {strategy.label!r}" + (f" (or its file {strategy.path})" if strategy.kind == "yaml" else "")
            raise ConfigError(f"{where}: 'epoch_caps.{unknown[0]}' names no source; sources: {', '.join(self.corpus.source_names)}")
        for source, (epochs, why) in sorted(needed.items()):
            cap = strategy.epoch_caps.get(source, self.cfg.max_epochs)
            if cap is not None and epochs > cap * (1 + 1e-9):
                raise FramelmError(
                    f"strategy {strategy.label!r}: source {source!r} needs {epochs:.3g} epochs{why} but at most {cap:g} are allowed; "
                    f"lower total_tokens, {'keep more cells' if strategy.cells else 'lower its weight'}, "
                    f"or raise epoch_caps.{source} / max_epochs")

    # cell-based strategies: each cell gets budget proportional to its tokens
    def _kept_cells(self, strategy: StrategyConfig) -> np.ndarray:
        """Row numbers of the cells a strategy draws from: its `cells`, or every cell."""
        names = self.corpus.cell_names
        if not strategy.cells:
            return np.arange(len(names))
        unknown = [c for c in strategy.cells if c not in names]
        if unknown:
            raise ConfigError(f"strategy {strategy.label!r}: 'cells' names unknown cell {unknown[0]!r}; cells: {', '.join(names)}")
        kept = np.array(sorted(names.index(c) for c in strategy.cells))
        if not self.cell_tokens[kept].sum():
            raise FramelmError(f"strategy {strategy.label!r}: the cells it keeps ({', '.join(strategy.cells)}) hold no "
                               f"training documents; non-empty cells: {', '.join(self._nonempty_cells())}")
        return kept

    def _cell_draws(self, strategy: StrategyConfig) -> dict[str, Draw]:
        """Each kept cell's documents for the strategy, in cell order."""
        kept = self._kept_cells(strategy)
        scale = self.total / self.cell_tokens[kept].sum()  # every kept cell, hence every source in them, repeats `scale` times
        present = np.flatnonzero(self.pair_docs[kept].sum(axis=0))
        self._check_caps(strategy, {self.corpus.source_names[s]: (scale, "") for s in present})
        streams = self.cell_streams(kept)
        return {self.corpus.cell_names[i]: streams[self.corpus.cell_names[i]].take(self.cell_tokens[i] * scale) for i in kept}

    def _cell_pool_tokens(self, strategy: StrategyConfig) -> dict[str, int]:
        """Per source: the tokens of its documents in the kept cells."""
        tokens = self.pair_tokens[self._kept_cells(strategy)].sum(axis=0)
        return {s: int(t) for s, t in zip(self.corpus.source_names, tokens)}

    def _nonempty_cells(self) -> list[str]:
        return [n for i, n in enumerate(self.corpus.cell_names) if self.cell_tokens[i] > 0]

    def frame_order(self) -> list[str]:
        """High PPL before low, and inside each PPL bin low PD before high: Q3, Q4, Q1, Q2."""
        cells = sorted(zip(self.corpus.cell_bins, self.corpus.cell_names), key=lambda c: (-c[0][0], c[0][1]))
        return [name for _, name in cells if name in self._nonempty_cells()]

    def _cells_in_order(self, strategy: StrategyConfig, order: list[str]) -> list[Stage]:
        draws = self._cell_draws(strategy)
        return [Stage(name, *draws[name]) for name in order if name in draws]

    def build(self, strategy: StrategyConfig) -> Schedule:
        kind = strategy.kind
        smooth = True
        pool_tokens = self._cell_pool_tokens(strategy)
        if kind == "frame":
            stages = self._cells_in_order(strategy, self.frame_order())
        elif kind == "permutation":
            stages = self._cells_in_order(strategy, self._check_order(strategy))
        elif kind == "random":
            draws = self._cell_draws(strategy)
            stages = [_shuffle(self.cfg.seed, "random", *concat_draws(list(draws.values())))]
        elif kind in ("ppl_two_stage", "pd_two_stage"):
            stages = self._two_stage(strategy)
        elif kind == "sorted":
            stages, smooth = self._sorted(strategy), False
        elif kind == "two_phase":
            stages, pool_tokens = self._two_phase(strategy)
        else:
            stages, pool_tokens = self._yaml(strategy)
        if not any(len(st.idx) for st in stages):
            # Every pool's budget rounded down to no document: the schedule would train on nothing.
            budgets = f"the stage budgets of {strategy.path}" if kind == "yaml" else f"total_tokens = {self.total:,.0f}"
            raise ConfigError(f"strategy {strategy.label!r}: no document fits {budgets}: each pool's share rounds "
                              f"to the nearest document boundary, and the shortest document holds "
                              f"{int(self.weight.min())} tokens with its EOS; raise {'them' if kind == 'yaml' else 'total_tokens'}")
        return Schedule(strategy.label, kind, stages, smooth, pool_tokens, list(strategy.cells))

    def _check_order(self, strategy: StrategyConfig) -> list[str]:
        kept = [self.corpus.cell_names[i] for i in self._kept_cells(strategy)]
        cells = [c for c in self._nonempty_cells() if c in kept]
        unknown = [c for c in strategy.order if c not in kept]
        if unknown:
            what = "a cell outside 'cells'" if unknown[0] in self.corpus.cell_names else "unknown cell"
            raise ConfigError(f"strategy {strategy.label!r}: 'order' names {what} {unknown[0]!r}; cells: {', '.join(kept)}")
        missing = [c for c in cells if c not in strategy.order]
        dupes = sorted({c for c in strategy.order if strategy.order.count(c) > 1})
        if missing or dupes:
            raise ConfigError(f"strategy {strategy.label!r}: 'order' must name every non-empty cell{' it keeps' if strategy.cells else ''} once "
                              f"({', '.join(cells)}); missing: {missing or 'none'}, repeated: {dupes or 'none'}")
        return [c for c in strategy.order if c in cells]

    def _two_stage(self, strategy: StrategyConfig) -> list[Stage]:
        """Split on one axis at its middle, PPL high then low or PD low then high: bins below
        n_bins // 2 are low, the rest high (of an odd number of bins, the middle one is high)."""
        axis = 0 if strategy.kind == "ppl_two_stage" else 1
        n_bins = max(b[axis] for b in self.corpus.cell_bins) + 1
        draws = self._cell_draws(strategy)
        bins = dict(zip(self.corpus.cell_names, self.corpus.cell_bins))
        high = [d for n, d in draws.items() if bins[n][axis] >= n_bins // 2]
        low = [d for n, d in draws.items() if bins[n][axis] < n_bins // 2]
        empty = [side for side, parts in (("high", high), ("low", low)) if not sum(int(w.sum()) for *_, w in parts)]
        if strategy.cells and empty:
            raise ConfigError(f"strategy {strategy.label!r}: the cells it keeps ({', '.join(strategy.cells)}) hold no "
                              f"{empty[0]}-{('PPL', 'PD')[axis]} documents (bins below {n_bins // 2} of {n_bins} are low), "
                              f"so its {empty[0]}_{('ppl', 'pd')[axis]} stage would be empty; keep cells on both sides, "
                              f"or use kind random (or sorted) for a one-stage schedule of them")
        if n_bins % 2:
            share = sum(int(w.sum()) for *_, w in high) / max(1, sum(int(w.sum()) for *_, w in high + low))
            log.warning("schedule %r: the partition has %d %s bins, an odd number, so the middle bin goes to the high "
                        "stage, which gets %.0f%% of the tokens; for an even split use an even number of bins or "
                        "{kind: sorted, column: %s, n_stages: 2}", strategy.label, n_bins, ("PPL", "PD")[axis],
                        100 * share, ("ppl, descending: true", "pd")[axis])
        if axis == 0:
            named = [("high_ppl", high), ("low_ppl", low)]
        else:
            named = [("low_pd", low), ("high_pd", high)]
        return [_shuffle(self.cfg.seed, name, *concat_draws(parts)) for name, parts in named]

    def _sorted(self, strategy: StrategyConfig) -> list[Stage]:
        idx, epoch, weight = concat_draws(list(self._cell_draws(strategy).values()))
        values = self.corpus.column(strategy.column)[idx]
        order = np.lexsort((idx, epoch, -values if strategy.descending else values))  # last key sorts first
        idx, epoch, weight = idx[order], epoch[order], weight[order]
        cum = np.cumsum(weight, dtype=np.int64)
        total = cum[-1] if len(cum) else 0
        cuts = np.searchsorted(cum, [total * k / strategy.n_stages for k in range(1, strategy.n_stages)])
        bounds = [0, *cuts.tolist(), len(idx)]
        name = f"{strategy.column}_{'desc' if strategy.descending else 'asc'}"
        return [Stage(name if strategy.n_stages == 1 else f"{name}_{k + 1}", idx[a:b], epoch[a:b], weight[a:b])
                for k, (a, b) in enumerate(zip(bounds, bounds[1:]))]

    def _source_weights(self, blend: dict[str, float], tiers: dict[str, str], where: str) -> dict[str, float]:
        """{source or tier: weight} -> {source: weight}; a tier's weight is split by its sources' tokens."""
        sources = self.corpus.source_names
        out: dict[str, float] = {}
        for key, w in blend.items():
            if key in sources:
                out[key] = out.get(key, 0.0) + w
                continue
            members = [s for s in sources if tiers.get(s) == key]
            if not members:
                raise ConfigError(f"{where}: {key!r} is neither a source ({', '.join(sources)}) nor a tier with sources "
                                  f"({', '.join(sorted(set(tiers.values()))) or 'no tiers given'})")
            tokens = np.array([self.source_tokens[sources.index(s)] for s in members], float)
            if not tokens.sum():  # sources of held-out or unscored documents only
                if w > 0:
                    raise FramelmError(f"{where}: tier {key!r} has weight but its sources ({', '.join(members)}) "
                                       f"have no training tokens")
                continue
            for s, t in zip(members, tokens):
                out[s] = out.get(s, 0.0) + w * t / tokens.sum()
        total = sum(out.values())  # check_weights lets a blend sum to 1 +- 1e-3: a phase gets all its tokens
        return {s: v / total for s, v in out.items()} if total > 0 else out

    def _two_phase(self, strategy: StrategyConfig) -> tuple[list[Stage], dict[str, int]]:
        sources = self.corpus.source_names
        bad_tier = [s for s in strategy.tiers if s not in sources]
        if bad_tier:
            raise ConfigError(f"strategy {strategy.label!r}: 'tiers.{bad_tier[0]}' names no source; sources: {', '.join(sources)}")
        blends = [self._source_weights(b, strategy.tiers, f"strategy {strategy.label!r}: blends[{p}]")
                  for p, b in enumerate(strategy.blends)]
        design = float(strategy.design_tokens or self.total)
        if design < self.total:
            raise ConfigError(f"strategy {strategy.label!r}: design_tokens {design:.0f} is below total_tokens {self.total:.0f}; "
                              "a blend can be downsampled to a shorter run, not stretched to a longer one")
        share = {s: sum(b.get(s, 0.0) * p for b, p in zip(blends, strategy.phase_split)) for s in sources}
        # Downsampling a source to total/design of its tokens keeps the epochs it is seen at the
        # design horizon in the actual (shorter) run, up to whole documents. The caps are checked
        # on the sample actually drawn: rounding to documents can shrink it below its target.
        streams = self.source_streams(self.total / design)
        needed = {}
        for i, s in enumerate(sources):
            if share[s] > 0:
                if self.source_tokens[i] == 0:
                    raise FramelmError(f"strategy {strategy.label!r}: source {s!r} has weight but no training tokens")
                pool = streams[s].tokens
                why = f" ({share[s]:.1%} of {self.total:,.0f} tokens"
                if pool < self.source_tokens[i]:
                    why += f", drawn from a {pool:,}-token sample of its {int(self.source_tokens[i]):,} for design_tokens {design:,.0f}"
                needed[s] = (share[s] * self.total / pool, why + ")")
        self._check_caps(strategy, needed)
        stages = []
        for p, (blend, phase) in enumerate(zip(blends, strategy.phase_split)):
            parts = [streams[s].take(w * phase * self.total) for s, w in sorted(blend.items())]
            stages.append(_shuffle(self.cfg.seed, f"phase{p + 1}", *concat_draws(parts)))
        return stages, {s: streams[s].tokens for s in sources}

    def _yaml(self, strategy: StrategyConfig) -> tuple[list[Stage], dict[str, int]]:
        spec = read_yaml_schedule(strategy.path, self.corpus, self.cfg.weight_tolerance)
        caps = dict(spec.get("epoch_caps", {}))
        caps.update(strategy.epoch_caps)
        strategy = dataclasses.replace(strategy, epoch_caps=caps)
        budgets = [st["tokens"] if "tokens" in st else st["share"] * self.total for st in spec["stages"]]
        by_cell = spec["over"] == "cells"
        names = self.corpus.cell_names if by_cell else self.corpus.source_names
        pool_tokens = self.cell_tokens if by_cell else self.source_tokens
        demand = {n: sum(b * st["mix"].get(n, 0.0) for b, st in zip(budgets, spec["stages"])) for n in names}
        needed = {}
        for i, n in enumerate(names):
            if demand[n] > 0 and pool_tokens[i] == 0:
                raise FramelmError(f"{strategy.path}: {n!r} has weight but no training tokens")
            if demand[n] > 0:
                epochs = demand[n] / pool_tokens[i]
                if by_cell:  # a cell is sampled evenly, so each of its sources repeats as often as the cell
                    for s in np.flatnonzero(self.pair_docs[i]):
                        src = self.corpus.source_names[s]
                        if epochs > needed.get(src, (0.0, ""))[0]:
                            needed[src] = (epochs, f" (through cell {n})")
                else:
                    needed[n] = (epochs, "")
        self._check_caps(strategy, needed)
        streams = self.cell_streams() if by_cell else self.source_streams()
        stages = []
        for st, budget in zip(spec["stages"], budgets):
            parts = [streams[n].take(w * budget) for n, w in sorted(st["mix"].items())]
            stages.append(_shuffle(self.cfg.seed, st["name"], *concat_draws(parts)))
        return stages, {s: int(t) for s, t in zip(self.corpus.source_names, self.source_tokens)}


YAML_STAGE_KEYS = {"name", "tokens", "share", "mix"}


def read_yaml_schedule(path: str | Path, corpus: Corpus, tolerance: float = 1e-3) -> dict[str, Any]:
    """Read and validate a user schedule:

        stages:
          - name: warmup        # optional; default stage1, stage2, ...
            share: 0.3          # of total_tokens; or `tokens: 3000000`
            mix: {Q3: 0.7, Q4: 0.3}   # cells or sources, weights summing to 1
        epoch_caps: {math: 4}   # optional

    Returns {"stages": [...], "over": "cells" | "sources", "epoch_caps": {...}}.
    """
    data = load_yaml(path)
    unknown = [k for k in data if k not in ("stages", "epoch_caps")]
    if unknown:
        raise ConfigError(f"{path}: unknown key {unknown[0]!r}; allowed: stages, epoch_caps")
    stages = data.get("stages")
    if not isinstance(stages, list) or not stages:
        raise ConfigError(f"{path}: 'stages' must be a non-empty list of {{name, tokens or share, mix}}")
    kinds, out, names = set(), [], set()
    for i, st in enumerate(stages):
        where = f"{path}: stages[{i}]"
        if not isinstance(st, dict):
            raise ConfigError(f"{where} must be a mapping with keys name, tokens or share, mix; got {st!r}")
        bad = [k for k in st if k not in YAML_STAGE_KEYS]
        if bad:
            raise ConfigError(f"{where}: unknown key {bad[0]!r}; allowed: {', '.join(sorted(YAML_STAGE_KEYS))}")
        name = str(st.get("name", f"stage{i + 1}"))
        if name in names:
            raise ConfigError(f"{where}: stage name {name!r} is used twice")
        names.add(name)
        if ("tokens" in st) == ("share" in st):
            raise ConfigError(f"{where} ({name}): give exactly one of 'tokens' (a count) or 'share' (of total_tokens)")
        entry: dict[str, Any] = {"name": name}
        if "tokens" in st:
            if isinstance(st["tokens"], bool) or not isinstance(st["tokens"], (int, float)) or st["tokens"] <= 0:
                raise ConfigError(f"{where}.tokens: must be a positive number, got {st['tokens']!r}")
            entry["tokens"] = float(st["tokens"])
        else:
            if isinstance(st["share"], bool) or not isinstance(st["share"], (int, float)) or not 0 < st["share"] <= 1:
                raise ConfigError(f"{where}.share: must be in (0, 1], got {st['share']!r}")
            entry["share"] = float(st["share"])
        mix = st.get("mix")
        if not isinstance(mix, dict):
            raise ConfigError(f"{where}.mix: must be a mapping {{cell or source: weight}}, got {mix!r}")
        mix = {str(k): v for k, v in mix.items()}
        check_weights(mix, f"{where}.mix", tolerance)
        for key in mix:
            if key in corpus.cell_names:
                kinds.add("cells")
            elif key in corpus.source_names:
                kinds.add("sources")
            else:
                raise ConfigError(f"{where}.mix: {key!r} is neither a cell ({', '.join(corpus.cell_names)}) "
                                  f"nor a source ({', '.join(corpus.source_names)})")
        total = sum(mix.values())
        entry["mix"] = {k: v / total for k, v in mix.items()}
        out.append(entry)
    if len(kinds) > 1:
        raise ConfigError(f"{path}: mixes name both cells and sources; use one kind throughout")
    shares = [e["share"] for e in out if "share" in e]
    if len(shares) == len(out) and abs(sum(shares) - 1) > tolerance:
        raise ConfigError(f"{path}: stage shares sum to {sum(shares):.6g}, not 1 (tolerance {tolerance:g})")
    caps = data.get("epoch_caps") or {}
    if not isinstance(caps, dict) or any(isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0 for v in caps.values()):
        raise ConfigError(f"{path}: 'epoch_caps' must map sources to positive numbers, got {caps!r}")
    return {"stages": out, "over": kinds.pop(), "epoch_caps": {str(k): float(v) for k, v in caps.items()}}
