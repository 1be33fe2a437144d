"""nanotron Nanoset folders and the `data_stages` YAML that trains them in order.

Layout chosen: nanotron's Nanoset reads every `*.ds` file in a dataset folder through datatrove's
DatatroveFolderDataset, so each fixed-mix segment (a pure stage or a transition slice) becomes
one folder RUN/export/<schedule>/nanotron/<NNN_segment>/ with one file triple as datatrove's
tokenizer writes it:
    000_<segment>.ds            tokens, little-endian uint16 (2 bytes) or uint32 (4 bytes)
    000_<segment>.ds.index      uint64 end position (in tokens, exclusive) of every document
    000_<segment>.ds.metadata   "<tokenizer>|<token bytes>\\n<n_tokens>\\n"
data_stages.yaml lists one nanotron data stage per segment (name, start_training_step counted
from 1, data.dataset with dataset_folder / dataset_weights / token_size_in_bytes / vocab_size /
tokenizer_name); phases.json records every segment's steps and realised stage mix, and
`total_steps`, the tokens.train_steps to train them with.

Steps: DatatroveFileDataset cuts a .ds file of T tokens into T // (seq_len + 1) disjoint samples
of seq_len + 1 tokens, and nanotron reads each data stage's Nanoset from its first sample, so a
segment gets T // (seq_len + 1) // global_batch steps: any more would wrap into a second epoch of
its documents (the Nanoset repeats its sample order), and a segment of no whole sample would fail
(the Nanoset divides by its sample count). Its other tokens (fewer than one step's) are not
trained. A segment too short for one step (global_batch * (seq_len + 1) tokens) is merged with a
neighbour first (`ExportPlan.step_segments`). A stream too short for one step is refused: nanotron
needs a data stage that starts at step 1.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from framelm import fsutil
from framelm.errors import FramelmError
from framelm.export.config import ExportConfig
from framelm.export.plan import INDEX_CHUNK_DOCS, ExportPlan, StepRule, write_binary
from framelm.rundir import RunDir

TOKEN_BYTES = {"uint16": 2, "uint32": 4}


def write_nanotron(plan: ExportPlan, cfg: ExportConfig, run: RunDir, out_dir: Path) -> dict[str, Any]:
    rule = StepRule("nanotron", *cfg.batch_shape(plan.stages_yaml, f"RUN/schedule/{plan.name}/stages.yaml"),
                    overlapping=False)
    token_bytes = TOKEN_BYTES[plan.store.dtype]
    tokenizer = cfg.tokenizer_name or str(plan.store.tokenizer_dir)
    if "|" in tokenizer or "\n" in tokenizer:
        # nanotron splits the metadata's first line at "|" into exactly two fields
        raise FramelmError(f"export/{plan.name}/nanotron: tokenizer name {tokenizer!r} holds '|' or a line break, "
                           "which .ds.metadata cannot hold; set export.tokenizer_name to a name without them")
    if rule.steps(plan.n_tokens) < 1:
        # nanotron's config refuses data_stages without a stage starting at step 1
        raise FramelmError(
            f"export/{plan.name}/nanotron: the schedule holds {plan.n_tokens:,} tokens, fewer than one step needs "
            f"(global_batch * (seq_len + 1) = {rule.tokens_for(1):,} tokens), so nanotron would get no data stage; "
            "lower export.global_batch or export.seq_len (or schedule.global_batch / schedule.seq_len), or raise "
            "schedule.total_tokens")
    segments = plan.step_segments(rule)
    written = 0
    for seg in segments:
        ds = out_dir / seg.folder / f"000_{seg.folder}.ds"
        written += write_binary(ds, (c.astype(f"<u{token_bytes}", copy=False) for c in
                                     plan.chunks(seg.start_token, seg.end_token, cfg.chunk_tokens,
                                                 f"{plan.name}/nanotron {seg.folder}")))
        ends = (np.asarray(plan.start[a:min(a + INDEX_CHUNK_DOCS, seg.end_doc)])
                + np.asarray(plan.length[a:min(a + INDEX_CHUNK_DOCS, seg.end_doc)]) - seg.start_token
                for a in range(seg.first_doc, seg.end_doc, INDEX_CHUNK_DOCS))
        written += write_binary(ds.with_name(ds.name + ".index"), (e.astype("<u8") for e in ends))
        written += write_binary(ds.with_name(ds.name + ".metadata"),
                                [f"{tokenizer}|{token_bytes}\n{seg.end_token - seg.start_token}\n".encode()])

    phases = plan.phases(rule)
    data_stages = []
    for ph in phases:
        data_stages.append({
            "name": ph["folder"],
            "start_training_step": ph["start_step"] + 1,  # nanotron counts steps from 1
            "data": {
                "dataset": {"dataset_folder": [str(out_dir / ph["folder"])], "dataset_weights": [1.0],
                            "token_size_in_bytes": token_bytes, "vocab_size": plan.store.vocab_size,
                            "tokenizer_name": tokenizer},
                "num_loading_workers": 1,
                "seed": 42,
            },
        })
    fsutil.write_yaml(out_dir / "data_stages.yaml", {"data_stages": data_stages})
    fsutil.write_json(out_dir / "phases.json", {
        "tokens_per_step": rule.tokens_per_step, "seq_len": rule.seq_len, "global_batch": rule.global_batch,
        "total_steps": phases[-1]["end_step"], "phases": phases, "stages": plan.stage_steps(rule)})
    n_files = 3 * len(segments)
    return {"files": n_files, "files_written": written, "data_stages": len(data_stages)}
