"""ExportConfig: which schedules to export, in which formats, with which format options."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from framelm.config import StageConfig, field
from framelm.errors import ConfigError

FORMATS = ("stream", "llmc", "megatron", "nanotron", "text")
LLMC_MAX_SHARD_TOKENS = 2**31 - 1  # the header stores the token count as int32
RECORD_FORMAT = 3  # 2: the record's counts give each schedule's stream digest under "parts"; 3: Megatron and
# nanotron phases get the steps their segment's own dataset can feed (ExportPlan.phases)


@dataclass
class ExportConfig(StageConfig):
    schedules: list[str] = field(default_factory=list, help="schedule names under RUN/schedule to export; empty: all of them")
    formats: list[str] = field(default_factory=lambda: ["stream"], help=f"output formats, any of: {', '.join(FORMATS)}")
    n_substages: int = field(4, help="fixed-mix slices per transition window, for formats that cannot ramp a mixture (megatron, nanotron, text)")
    seq_len: int | None = field(None, help="training sequence length in tokens, for iteration boundaries (megatron, nanotron); unset: stages.yaml's seq_len")
    global_batch: int | None = field(None, help="sequences per optimizer step, for iteration boundaries (megatron, nanotron); unset: stages.yaml's global_batch")
    llmc_shard_tokens: int = field(100_000_000, help="most tokens per llm.c .bin shard; the stream is split into equal shards of at most this many (llm.c's own default: 100 M)")
    text_format: Literal["parquet", "jsonl"] = field("parquet", help="file format of the text export")
    tokenizer_name: str | None = field(None, help="tokenizer name written into nanotron's .ds.metadata; unset: the path of RUN/tokenize/tokenizer")
    chunk_tokens: int = field(1 << 22, hash=False, help="tokens gathered and written per step (bounds memory: ~10 bytes per token)")
    duckdb_memory_limit: str = field("2GB", hash=False, help="DuckDB memory limit for the order/index and text joins (spills to disk beyond it)")
    threads: int = field(2, hash=False, help="DuckDB threads")

    def validate(self) -> None:
        bad = [f for f in self.formats if f not in FORMATS]
        if bad or not self.formats:
            raise ConfigError(f"'formats' = {self.formats!r}: choose one or more of {', '.join(FORMATS)}, e.g. formats: [stream, llmc]")
        for name in self.schedules:
            if not name or "/" in name or name.startswith("."):  # it names RUN/export/<name>, which must stay inside
                raise ConfigError(f"'schedules' entry {name!r} must be a schedule name such as 'frame' (no slashes or leading dot)")
        if len(set(self.formats)) != len(self.formats):
            raise ConfigError(f"'formats' = {self.formats!r} lists a format twice")
        if self.n_substages < 1:
            raise ConfigError(f"'n_substages' = {self.n_substages} must be at least 1")
        for key in ("seq_len", "global_batch"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(f"'{key}' = {value} must be a positive integer")
        if not 1 <= self.llmc_shard_tokens <= LLMC_MAX_SHARD_TOKENS:
            raise ConfigError(f"'llmc_shard_tokens' = {self.llmc_shard_tokens} must be in [1, {LLMC_MAX_SHARD_TOKENS}]")
        if self.chunk_tokens < 1:
            raise ConfigError(f"'chunk_tokens' = {self.chunk_tokens} must be positive")
        if self.threads < 1:
            raise ConfigError(f"'threads' = {self.threads} must be positive")

    def hashed_dict(self) -> dict[str, Any]:
        # Records of an older framelm lack counts["parts"] (the per-schedule stream digests that
        # training depends on): a new hash re-exports them, and each model trained on an older
        # export is trained once more (its upstream is now its schedule's part).
        return {**super().hashed_dict(), "record_format": RECORD_FORMAT}

    def upstream(self) -> tuple[str, ...]:
        """Stages whose outputs the export reads: the schedules, the token store and, for text, ingest."""
        return ("schedule", "tokenize") + (("ingest",) if "text" in self.formats else ())

    def batch_shape(self, stages_yaml: dict[str, Any], where: str) -> tuple[int, int]:
        """(seq_len, global_batch), from this config or else from the schedule's stages.yaml."""
        values = {}
        for key in ("seq_len", "global_batch"):
            value = getattr(self, key)
            if value is None:
                value = stages_yaml.get(key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"export needs '{key}' for iteration boundaries: set export.{key} "
                                  f"(e.g. --{key.replace('_', '-')} 1024) or record it in {where}")
            values[key] = value
        return values["seq_len"], values["global_batch"]
