"""`framelm export`: write schedules in the formats trainers read.

For each schedule under RUN/schedule (or those named in `ExportConfig.schedules`), reads
RUN/schedule/<name>/{order.parquet,stages.yaml} and the token store RUN/tokenize, and writes
RUN/export/<name>/<format>/ for each format in `ExportConfig.formats`:

- stream:   tokens.bin + meta.json, the flat stream framelm's trainer reads (`stream.py`)
- llmc:     llm.c / modded-nanogpt uint16 .bin shards + stages.json (`llmc.py`)
- megatron: Megatron-LM indexed datasets per segment + data_paths.txt, phases.json (`megatron.py`)
- nanotron: Nanoset folders per segment + data_stages.yaml (`nanotron.py`)
- text:     raw text per segment, Parquet or JSON lines (`text.py`, also reads RUN/ingest)

plus RUN/export/<name>/plan/ and segments.json shared by all formats (`plan.py`). Every file
is written atomically with a .done marker; a restarted export skips finished files and ends
byte-identical to an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Callable

from framelm import fsutil
from framelm.config import stable_hash
from framelm.errors import FramelmError
from framelm.export.config import FORMATS, ExportConfig
from framelm.export.llmc import write_llmc
from framelm.export.megatron import write_megatron
from framelm.export.nanotron import write_nanotron
from framelm.export.plan import ExportPlan, open_plan
from framelm.export.stream import write_stream
from framelm.export.text import write_text
from framelm.rundir import RunDir

__all__ = ["ExportConfig", "export_schedules", "FORMATS"]

log = logging.getLogger("framelm")

WRITERS: dict[str, Callable[..., dict[str, Any]]] = {
    "stream": write_stream, "llmc": write_llmc, "megatron": write_megatron,
    "nanotron": write_nanotron, "text": write_text,
}


def export_schedules(cfg: ExportConfig, run: RunDir) -> dict[str, Any]:
    """Export every selected schedule in every configured format; return counts per schedule.

    The counts describe the output, not this invocation: how many files a resumed run found
    already finished is logged, so a killed-and-restarted export records what an uninterrupted
    one does."""
    names = cfg.schedules or _schedule_names(run)
    counts: dict[str, Any] = {"schedules": len(names), "files": 0}
    written = 0
    for name in names:
        fsutil.clean_temporaries(run.path("export", name))  # leftovers of a killed run (also done by run_stage)
        plan: ExportPlan = open_plan(run, name, cfg.n_substages, memory_limit=cfg.duckdb_memory_limit,
                                     threads=cfg.threads)
        per_schedule: dict[str, Any] = {"documents": plan.n_docs, "tokens": plan.n_tokens,
                                        "segments": len(plan.segments)}
        for fmt in cfg.formats:
            result = WRITERS[fmt](plan, cfg, run, run.path("export", name, fmt))
            written += result.pop("files_written")
            counts["files"] += result["files"]
            per_schedule[fmt] = result
        log.info("export/%s: %d documents, %d tokens, %d segments -> %s", name, plan.n_docs, plan.n_tokens,
                 len(plan.segments), ", ".join(cfg.formats))
        counts[name] = per_schedule
        if "stream" in cfg.formats:
            counts.setdefault("parts", {})[name] = stream_digest(run, name)
    if written < counts["files"]:
        log.info("export: %d of %d files were already finished", counts["files"] - written, counts["files"])
    return counts


def stream_digest(run: RunDir, name: str) -> str:
    """One hash of what training on schedule `name` reads: its stream, made from exactly the
    inputs its export plan fingerprinted (plan/inputs.json: the schedule's order and stages, the
    token store), and its held-out sets, drawn from the token store and labelled by the
    partition. Training depends on this part of the export (upstream key export#<name>), so
    exporting another schedule leaves its models up to date."""
    inputs = json.loads(run.path("export", name, "plan", "inputs.json").read_text())
    return stable_hash({"stream_inputs": inputs, "partition": (run.record("partition") or {}).get("hash")})


def _schedule_names(run: RunDir) -> list[str]:
    root = run.path("schedule")
    names = sorted(p.name for p in root.iterdir() if (p / "order.parquet").is_file()) if root.is_dir() else []
    if not names:
        raise FramelmError(f"no schedules found under {root} (each needs order.parquet); "
                           f"run framelm schedule --run-dir {run.root} first")
    return names
