"""The partition's label file: which cell of the PPL x PD grid each scored document is in.

RUN/partition/quadrants.parquet is an attribute file, as Dolma's are: one `quadrant` per row of
RUN/score/scores.parquet, in its order (null where the document has no usable score), so that
100 M ids and scores are not copied into a second table. Its Parquet metadata (key
framelm.labels) lists the cells as (name, ppl_bin, pd_bin) and fingerprints the scores file it
labels (rows, bytes, a hash of its Parquet footer).

`framelm partition` writes it (`write_labels`); schedule, heldout, evaluate, compare and report
read it: `read_labels` (a code per row, streamed), `read_labelled` (the labelled rows as one
table, for small runs and tests), `labelled_sql` (a DuckDB subquery), `label_cells`. Every
reader refuses a scores file that changed after the partition.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from framelm import fsutil
from framelm.columnar import Categories, row_groups
from framelm.errors import FramelmError
from framelm.rundir import RunDir
from framelm.sql import sql_str

SCORES = "score/scores.parquet"
LABELS = "partition/quadrants.parquet"
LABELS_METADATA = b"framelm.labels"
LABELS_FORMAT = 2  # 1: quadrants.parquet copied id, source, split, n_tokens, ppl, pd beside the labels
ROW_GROUP_ROWS = 1 << 20


def write_labels(path: Path, scores: Path, cells: list[tuple[str, int, int]], codes: Any) -> None:
    """Write a label file for `scores`: `codes` yields, a slice of scores' rows at a time, each
    row's index into `cells` ((name, ppl_bin, pd_bin)), -1 for no label."""
    import json

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    meta = {**_fingerprint(scores), "cells": [list(c) for c in cells]}
    n_rows = meta["scores_rows"]
    schema = pa.schema([pa.field("quadrant", pa.dictionary(pa.int16(), pa.string()))],
                       metadata={LABELS_METADATA: json.dumps(meta).encode()})
    names = pa.array([c[0] for c in cells], pa.string())
    written = 0
    with fsutil.atomic_path(path) as tmp, pq.ParquetWriter(tmp, schema, compression="lz4", write_statistics=False) as writer:
        for part in codes:
            part = np.asarray(part, np.int16)
            labels = pa.DictionaryArray.from_arrays(pa.array(part, mask=part < 0), names)
            writer.write_batch(pa.record_batch([labels], schema=schema), row_group_size=ROW_GROUP_ROWS)
            written += len(part)
        if written != n_rows:  # a caller's bug; the temporary file is discarded
            raise FramelmError(f"{path}: {written} labels written for the {n_rows} rows of {scores}")


def _fingerprint(scores: Path) -> dict[str, Any]:
    """What identifies a scores file cheaply: its rows, bytes and a hash of its Parquet footer
    (which holds every column chunk's offsets, sizes and min/max), so a file re-scored to the
    same size is told apart unless every column chunk also kept its min and max. Hashing the
    whole file would catch that too, at seconds per reader on 100 M rows; the manifest's
    config and input hashes are what re-run the partition after a re-score."""
    import hashlib

    import pyarrow.parquet as pq

    try:
        rows = pq.ParquetFile(scores).metadata.num_rows  # first, as it checks the file is Parquet
    except Exception as exc:  # truncated or not Parquet at all
        raise FramelmError(f"{scores}: not a readable Parquet file ({exc}); re-run: "
                           f"framelm score --run-dir {scores.parent.parent} --force") from None  # scores: RUN/score/scores.parquet
    with open(scores, "rb") as f:
        f.seek(-8, 2)
        footer_len = int.from_bytes(f.read(4), "little")
        f.seek(-8 - footer_len, 2)
        footer = hashlib.sha256(f.read(footer_len)).hexdigest()
    return {"scores_rows": rows, "scores_bytes": scores.stat().st_size, "scores_footer_sha256": footer}


def _label_file(run: RunDir) -> tuple[Any, dict[str, Any]]:
    """The label file (a ParquetFile) and its metadata, checked against scores.parquet."""
    import json

    import pyarrow.parquet as pq

    path, scores = run.path(LABELS), run.path(SCORES)
    for p, stage in ((scores, "score"), (path, "partition")):
        if not p.is_file():
            raise FramelmError(f"{p} not found; run the {stage} stage first: framelm {stage} --run-dir {run.root}")
    rerun = f"framelm partition --run-dir {run.root} --force"
    try:
        parquet = pq.ParquetFile(path, read_dictionary=["quadrant"])
    except Exception as exc:  # truncated or not Parquet at all
        raise FramelmError(f"{path}: not a readable Parquet file ({exc}); re-run: {rerun}") from None
    raw = (parquet.schema_arrow.metadata or {}).get(LABELS_METADATA)
    try:
        meta = json.loads(raw) if raw is not None and "quadrant" in parquet.schema_arrow.names else None
        if meta is not None:
            meta["cells"] = [(str(name), int(p), int(d)) for name, p, d in meta["cells"]]
            meta["scores_rows"], meta["scores_bytes"] = int(meta["scores_rows"]), int(meta["scores_bytes"])
    except (ValueError, TypeError, KeyError):
        meta = None
    if meta is None:  # e.g. a quadrants.parquet of framelm before labels became their own file
        raise FramelmError(f"{path}: not a framelm label file (a 'quadrant' column and {LABELS_METADATA.decode()} metadata "
                           f"listing cells and the scores file expected); re-run: {rerun}")
    now = _fingerprint(scores)
    if any(meta.get(k) != v for k, v in now.items()) or parquet.metadata.num_rows != now["scores_rows"]:
        raise FramelmError(f"{path} labels a scores file of {meta['scores_rows']:,} rows and {meta['scores_bytes']:,} bytes, "
                           f"but {scores} has {now['scores_rows']:,} rows and {now['scores_bytes']:,} bytes"
                           f"{' (and other contents)' if meta['scores_bytes'] == now['scores_bytes'] else ''}: "
                           f"the scores changed after the partition. Re-run: {rerun}")
    return parquet, meta


def label_cells(run: RunDir) -> list[tuple[str, int, int]]:
    """The cells ((name, ppl_bin, pd_bin)) of the label file, from its metadata alone."""
    return [tuple(c) for c in _label_file(run)[1]["cells"]]


def read_labels(run: RunDir) -> tuple[Any, list[tuple[str, int, int]]]:
    """Each scores.parquet row's cell as an int16 index into the returned cells ((name,
    ppl_bin, pd_bin)); -1 where the row has no label."""
    import numpy as np

    parquet, meta = _label_file(run)
    cells = meta["cells"]
    names = Categories(c[0] for c in cells)  # code i is cell i; any other value gets a code past them
    codes = np.empty(parquet.metadata.num_rows, np.int16)
    at = 0
    for table in row_groups(parquet, ["quadrant"]):
        codes[at:at + table.num_rows] = names.codes(table.column("quadrant"))
        at += table.num_rows
        if len(names.values) > len(cells):
            raise FramelmError(f"{run.path(LABELS)}: label {names.values[len(cells)]!r} is not one of its cells "
                               f"{names.values[:len(cells)]}; re-run: framelm partition --run-dir {run.root} --force")
    return codes, cells


def read_labelled(run: RunDir, columns: list[str] | None = None) -> Any:
    """The labelled rows of scores.parquet (`columns`, default all) with quadrant, ppl_bin and
    pd_bin appended, as one in-memory pyarrow Table: for small runs and tests. Large readers
    stream (`read_labels`) or aggregate in DuckDB (`labelled_sql`)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    codes, cells = read_labels(run)
    rows = np.flatnonzero(codes >= 0)
    table = pq.read_table(run.path(SCORES), columns=columns).take(pa.array(rows))
    cell = pa.array(codes[rows])
    for name, values, kind in (("quadrant", [c[0] for c in cells], pa.string()), ("ppl_bin", [c[1] for c in cells], pa.int8()),
                               ("pd_bin", [c[2] for c in cells], pa.int8())):
        table = table.append_column(name, pa.array(values, kind).take(cell))
    return table


def labelled_sql(run: RunDir) -> str:
    """A DuckDB subquery over the labelled rows of scores.parquet: its columns, `file_row_number`
    (the row in scores.parquet) and quadrant, ppl_bin, pd_bin. Rows pair up by position."""
    _, meta = _label_file(run)

    def bin_of(k: int) -> str:  # CASE, not a join to a table of cells: DuckDB cannot size a
        # Parquet scan, so it would build the join's hash table on the 100 M rows (GBs)
        arms = " ".join(f"WHEN {sql_str(c[0])} THEN {int(c[k])}" for c in meta["cells"])
        return f"(CASE l.quadrant {arms} END)::TINYINT"

    return (f"(SELECT s.*, l.quadrant, {bin_of(1)} AS ppl_bin, {bin_of(2)} AS pd_bin "
            f"FROM read_parquet({sql_str(str(run.path(SCORES)))}, file_row_number = true) s "
            f"POSITIONAL JOIN read_parquet({sql_str(str(run.path(LABELS)))}) l WHERE l.quadrant IS NOT NULL)")
