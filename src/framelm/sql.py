"""DuckDB helpers shared by the stages that query Parquet files: one connection setup, one SQL
string quoting and one column check, so that every stage spills, quotes and words errors alike."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from framelm.errors import FramelmError


def sql_str(text: str) -> str:
    """`text` as an SQL string literal."""
    return "'" + str(text).replace("'", "''") + "'"


def connect(memory_limit: str, threads: int, temp_directory: str | Path | None = None) -> Any:
    """An in-memory DuckDB connection that keeps rows in insertion order and spills to
    `temp_directory` (DuckDB's default, ./.tmp, without one) beyond `memory_limit`."""
    import duckdb

    config: dict[str, Any] = {"memory_limit": memory_limit, "threads": int(threads), "preserve_insertion_order": True}
    if temp_directory is not None:
        config["temp_directory"] = str(temp_directory)
    con = duckdb.connect(config=config)
    # Not settable through config=; on, it would print into the CLI's output on long queries.
    con.execute("SET enable_progress_bar = false")
    return con


def parquet_columns(con: Any, path: str | Path, needed: Iterable[str], remedy: str = "") -> list[str]:
    """The column names of the Parquet file `path`. A file that is not readable Parquet, or one
    that lacks a column of `needed`, raises a FramelmError naming it, followed by `remedy`."""
    import duckdb

    suffix = f"; {remedy}" if remedy else ""
    needed = list(needed)
    try:
        names = [row[0] for row in con.execute(f"DESCRIBE SELECT * FROM read_parquet({sql_str(str(path))})").fetchall()]
    except duckdb.Error as exc:  # truncated, or not Parquet at all
        # its first line says what is wrong; the rest quotes this module's query back
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FramelmError(f"{path}: not a readable Parquet file ({reason}){suffix}") from None
    missing = [c for c in needed if c not in names]
    if missing:
        raise FramelmError(f"{path}: missing column(s) {', '.join(missing)}; expected at least {', '.join(needed)}{suffix}")
    return names
