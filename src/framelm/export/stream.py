"""The flat token stream the framelm trainer reads.

Writes RUN/export/<schedule>/stream/tokens.bin (the schedule's documents in order, EOS after
each, in the token store's dtype) and meta.json {"dtype", "n_tokens", "eos_id", "vocab_size",
"stages": [{"name", "start_token", "end_token"}]} with the stage ranges of stages.yaml.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from framelm import fsutil
from framelm.export.config import ExportConfig
from framelm.export.plan import ExportPlan, write_binary
from framelm.rundir import RunDir


def write_stream(plan: ExportPlan, cfg: ExportConfig, run: RunDir, out_dir: Path) -> dict[str, Any]:
    written = write_binary(out_dir / "tokens.bin",
                           plan.chunks(0, plan.n_tokens, cfg.chunk_tokens, f"{plan.name}/stream"))
    fsutil.write_json(out_dir / "meta.json", {
        "dtype": plan.store.dtype, "n_tokens": plan.n_tokens, "eos_id": plan.store.eos_id,
        "vocab_size": plan.store.vocab_size,
        "stages": [{"name": s.name, "start_token": s.start_token, "end_token": s.end_token} for s in plan.stages],
    })
    return {"files": 1, "files_written": int(written), "tokens": plan.n_tokens}
