"""nanotron Nanoset folders and the `data_stages` YAML that trains them in order.

Layout chosen: nanotron's Nanoset reads every `*.ds` file in a dataset folder through datatrove's
DatatroveFolderDataset, so each fixed-mix segment (a pure stage or a transition slice) becomes
one folder RUN/export/<schedule>/nanotron/<NNN_segment>/ with one file triple as datatrove's
tokenizer writes it:
    000_<segment>.ds            tokens, little-endian uint16 (2 bytes) or uint32 (4 bytes)
    000_<segment>.ds.index      uint64 end position (in tokens, exclusive) of every document
    000_<segment>.ds.metadata   "<tokenizer>|<token bytes>\\n<n_tokens>\\n"
Segments shorter than one optimizer step are merged with a neighbour first
(`ExportPlan.step_segments`), so that each gets steps. data_stages.yaml lists one nanotron data
stage per segment (name, start_training_step counted from 1, data.dataset with dataset_folder /
dataset_weights / token_size_in_bytes / vocab_size / tokenizer_name); phases.json records every
segment's steps and realised stage mix.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from framelm import fsutil
from framelm.export.config import ExportConfig
from framelm.export.plan import INDEX_CHUNK_DOCS, ExportPlan, write_binary
from framelm.rundir import RunDir

log = logging.getLogger("framelm")
TOKEN_BYTES = {"uint16": 2, "uint32": 4}


def write_nanotron(plan: ExportPlan, cfg: ExportConfig, run: RunDir, out_dir: Path) -> dict[str, Any]:
    tokens_per_step = cfg.tokens_per_step(plan.stages_yaml, f"RUN/schedule/{plan.name}/stages.yaml")
    token_bytes = TOKEN_BYTES[plan.store.dtype]
    tokenizer = cfg.tokenizer_name or str(plan.store.tokenizer_dir)
    segments = plan.step_segments(tokens_per_step)
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

    phases = plan.phases(tokens_per_step)
    data_stages = []
    for ph in phases:
        if ph["end_step"] == ph["start_step"]:
            log.warning("export/%s/nanotron: the whole stream (%d tokens) is shorter than one step of %d tokens; "
                        "nanotron gets no data stage", plan.name, ph["tokens"], tokens_per_step)
            continue
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
    fsutil.write_json(out_dir / "phases.json", {"tokens_per_step": tokens_per_step, "phases": phases,
                                                "stages": plan.stage_steps(tokens_per_step)})
    n_files = 3 * len(segments)
    return {"files": n_files, "files_written": written, "data_stages": len(data_stages)}
