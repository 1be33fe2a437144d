"""Megatron-LM / Megatron-Core indexed datasets, one per fixed-mix segment.

Writes RUN/export/<schedule>/megatron/<NNN_segment>.bin/.idx for every segment of the plan (a
pure stage, or a slice of a transition window), each holding that segment's documents in stream
order, one sequence per document (EOS included), like Megatron's preprocess_data.py with
--append-eod. Also data_paths.txt (per segment: its iterations and the `--data-path` and
`--split 100,0,0` arguments to train them with) and phases.json (the same, machine-readable, with
each segment's realised stage mix, each stage's iteration range and `total_iterations`).

Iterations: Megatron-Core's GPTDataset draws samples of seq_len + 1 tokens that share one token
with the next (add_extra_token_to_sequence), so one epoch of a segment of T tokens holds
(T - 1) // seq_len samples, and a segment gets that many // global_batch iterations: any more
would wrap into a second epoch of its documents. Its other tokens (fewer than one iteration's)
are not trained. A segment too short for one iteration (global_batch * seq_len + 1 tokens) is
merged with a neighbour first (`ExportPlan.step_segments`); phases follow one another, so
`total_iterations` can fall short of the stream's tokens // (global_batch * seq_len).

Caveat (stated in data_paths.txt too): these counts assume that each phase reads its dataset from
its first sample. Megatron resumed from a checkpoint (--load, not --finetune) restores
consumed_train_samples and starts its sampler there, inside the new phase's dataset, which it
builds for train_iters * global_batch samples over several shuffled epochs: a phase run that way
trains on its own segment's documents, but some repeated and some skipped.

.idx layout (little-endian): b"MMIDIDX\\x00\\x00", version uint64 = 1, dtype code uint8,
sequence count uint64, document-index count uint64, sequence lengths int32[n],
sequence byte pointers int64[n], document indices int64[n + 1]. .bin: the tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import numpy as np

from framelm import fsutil
from framelm.errors import FramelmError
from framelm.export.config import ExportConfig
from framelm.export.plan import INDEX_CHUNK_DOCS, ExportPlan, Segment, StepRule, write_binary
from framelm.rundir import RunDir

INDEX_MAGIC = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
# Megatron-Core's DType codes; it has no uint32, so larger vocabularies are stored as int32
# (what Megatron's own preprocessing picks for vocabularies of 65500 and more).
DTYPE_CODES = {"uint16": (np.dtype("<u2"), 8), "uint32": (np.dtype("<i4"), 4)}
# Every token of a segment is scheduled for training: Megatron's default split (969,30,1) would
# hold 3.1 % of each out for validation and test.
SPLIT = "100,0,0"


def write_megatron(plan: ExportPlan, cfg: ExportConfig, run: RunDir, out_dir: Path) -> dict[str, Any]:
    rule = StepRule("Megatron", *cfg.batch_shape(plan.stages_yaml, f"RUN/schedule/{plan.name}/stages.yaml"),
                    overlapping=True)
    tokens_per_step = rule.tokens_per_step
    dtype, code = DTYPE_CODES[plan.store.dtype]
    if plan.store.vocab_size > np.iinfo(dtype).max + 1:
        raise FramelmError(f"vocab_size {plan.store.vocab_size} does not fit Megatron's {dtype} tokens")
    if rule.steps(plan.n_tokens) < 1:
        # Megatron trains whole iterations: a stream shorter than one would train 0 iterations
        raise FramelmError(
            f"export/{plan.name}/megatron: the schedule holds {plan.n_tokens:,} tokens, fewer than one iteration "
            f"needs (global_batch * seq_len + 1 = {rule.tokens_for(1):,} tokens), so Megatron would train 0 "
            "iterations; lower export.global_batch or export.seq_len (or schedule.global_batch / "
            "schedule.seq_len), or raise schedule.total_tokens")
    segments = plan.step_segments(rule)
    written = 0
    for seg in segments:
        prefix = out_dir / seg.folder
        pieces = (c.astype(dtype, copy=False) for c in
                  plan.chunks(seg.start_token, seg.end_token, cfg.chunk_tokens, f"{plan.name}/megatron {seg.folder}"))
        written += write_binary(prefix.with_suffix(".bin"), pieces)
        written += write_binary(prefix.with_suffix(".idx"), _index_parts(plan, seg, code, dtype.itemsize))

    phases = plan.phases(rule)
    total = phases[-1]["end_step"]
    lines = [f"# Megatron-LM data for schedule '{plan.name}': one training phase per segment, in order, "
             f"{total} iterations in all.",
             f"# iterations use tokens_per_iteration = global_batch * seq_len = {tokens_per_step}: each phase gets "
             "the iterations one epoch of its dataset feeds ((tokens - 1) // seq_len samples, global_batch each).",
             f"# Train each phase for its iterations with its --data-path and --split {SPLIT}: the default split",
             "# (969,30,1) holds 3.1 % of every segment out of training.",
             "# The counts assume each phase reads its dataset from its first sample. Megatron resumed from a checkpoint",
             "# (--load without --finetune) starts its sampler at the checkpoint's consumed_train_samples instead, inside",
             "# the new phase's multi-epoch dataset: that phase then repeats some of its documents and skips others.",
             f"# Paths are absolute, as of the export: after moving {run.root}, re-run framelm export --force."]
    for ph in phases:
        mix = ", ".join(f"{k} {v:.4f}" for k, v in ph["mix"].items())
        lines.append(f"# {ph['folder']}: {ph['kind']}, tokens [{ph['start_token']}, {ph['end_token']}), "
                     f"iterations [{ph['start_step']}, {ph['end_step']}), mix: {mix}")
        lines.append(f"--data-path 1.0 {out_dir / ph['folder']} --split {SPLIT}")
    fsutil.write_text(out_dir / "data_paths.txt", "\n".join(lines) + "\n")
    fsutil.write_json(out_dir / "phases.json", {
        "tokens_per_iteration": tokens_per_step, "seq_len": rule.seq_len, "global_batch": rule.global_batch,
        "total_iterations": total, "dtype": str(dtype), "split": SPLIT, "phases": phases,
        "stages": plan.stage_steps(rule)})
    n_files = 2 * len(segments)
    return {"files": n_files, "files_written": written, "datasets": len(segments)}


def _index_parts(plan: ExportPlan, seg: Segment, code: int, itemsize: int) -> Iterator[bytes]:
    n_seq = seg.end_doc - seg.first_doc
    if n_seq and int(np.max(plan.length[seg.first_doc:seg.end_doc])) > np.iinfo(np.int32).max:
        raise FramelmError(f"a document in segment {seg.name} is longer than Megatron's int32 sequence lengths allow")
    yield INDEX_MAGIC
    yield np.array([INDEX_VERSION], "<u8").tobytes()
    yield np.array([code], "<u1").tobytes()
    yield np.array([n_seq, n_seq + 1], "<u8").tobytes()
    docs = range(seg.first_doc, seg.end_doc, INDEX_CHUNK_DOCS)
    for a in docs:
        yield np.asarray(plan.length[a:min(a + INDEX_CHUNK_DOCS, seg.end_doc)], "<i4").tobytes()
    for a in docs:
        starts = np.asarray(plan.start[a:min(a + INDEX_CHUNK_DOCS, seg.end_doc)]) - seg.start_token
        yield (starts * itemsize).astype("<i8").tobytes()
    for a in range(0, n_seq + 1, INDEX_CHUNK_DOCS):  # one document per sequence: indices 0..n
        yield np.arange(a, min(a + INDEX_CHUNK_DOCS, n_seq + 1), dtype="<i8").tobytes()
