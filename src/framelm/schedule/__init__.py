"""Order the partitioned training documents into curricula: one schedule per strategy.

Reads  RUN/score/scores.parquet with its labels RUN/partition/quadrants.parquet (labelled
       split == "train" rows only) and RUN/partition/summary.json (the grid of cells); a `yaml`
       strategy also reads the user's schedule file.
Writes RUN/schedule/<strategy>/order.parquet   position: int64, id, stage: int32, source,
                                               quadrant, n_tokens, epoch: int32
       RUN/schedule/<strategy>/stages.yaml     (a selection's kept `cells`); per stage: name, start/end token, start/end
                                               optimizer step, docs, tokens, composition
                                               (token share per cell and per source); per
                                               source: tokens available, in the pool the
                                               strategy draws from, scheduled, and epochs.

A document contributes n_tokens + 1 (its EOS) to the stream. Every strategy draws its
documents from *pools* (a cell or a source) through a `PoolStream`: a seeded permutation of
the pool per epoch, consumed in order, so a budget below the pool's tokens subsamples it and a
budget above repeats it (the `epoch` column counts repeats). Strategies that draw the same
budgets from the same pools with the same seed (frame, random, permutation, the two-stage
splits, sorted, when they keep the same `cells`) therefore schedule exactly the same multiset of
documents and differ only in order. Between consecutive stages the next stage's share rises along a transition curve over a
window centred on the boundary; the nominal boundary (the token where the unmixed stream
would switch) is what stages.yaml records, so stage token ranges are contiguous and each
stage's range length equals its documents' tokens. Step ranges are half-open,
[start_step, end_step), with start_step = start_token // tokens_per_step and end_step =
ceil(end_token / tokens_per_step): a step that straddles a boundary belongs to both stages.
Trainers take whole steps only, so total_steps = total_tokens // tokens_per_step, no end_step
passes it, and the `tail_tokens` after the last whole step are not trained on.

Modules, in the order the data flows through them:
  config.py       ScheduleConfig and StrategyConfig, the stage's settings
  corpus.py       Corpus: the training documents as arrays, read from the score and partition outputs
  pools.py        PoolStream: seeded epochs over a pool of documents; the cache-friendly shuffle
  strategies.py   Builder: each strategy kind's stages (Stage, Schedule); the `yaml` schedule file
  transitions.py  assemble: the stages as one Stream, blended at each boundary
  build.py        build_schedules, the stage's entry: writes order.parquet and stages.yaml, warns

Tuning constants (WRITE_CHUNK_ROWS, SHUFFLE_BUCKET_ROWS, ...) live in the module that uses
them: patch them there.
"""

from framelm.schedule.build import (
    build_schedules, describe, load_stages, warn_about_scale, warn_about_thin_blends, write_order,
)
from framelm.schedule.config import ScheduleConfig, StrategyConfig, check_weights
from framelm.schedule.corpus import Corpus, load_corpus
from framelm.schedule.pools import PoolStream, permute_first_epochs, shuffled
from framelm.schedule.strategies import YAML_STAGE_KEYS, Builder, Schedule, Stage, read_yaml_schedule
from framelm.schedule.transitions import Stream, assemble, transition_share

__all__ = [
    "Builder", "Corpus", "PoolStream", "Schedule", "ScheduleConfig", "Stage", "StrategyConfig", "Stream",
    "YAML_STAGE_KEYS", "assemble", "build_schedules", "check_weights", "describe", "load_corpus", "load_stages",
    "permute_first_epochs", "read_yaml_schedule", "shuffled", "transition_share", "warn_about_scale",
    "warn_about_thin_blends", "write_order",
]
