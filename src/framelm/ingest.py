"""`framelm ingest`: read raw corpora into one Parquet document table.

Inputs (paths or globs, read in the order given, each glob's matches sorted):

- JSON lines: `*.jsonl` / `*.json` / `*.ndjson`, plain or compressed (`.gz`, `.zst`);
- Parquet files (`*.parquet`);
- a directory of `.txt` files (one document per file, source = the directory's name);
- a directory written by Hugging Face `datasets` `save_to_disk` (a Dataset or DatasetDict);
- a directory of JSON-lines / Parquet files (each read as above);
- the word `builtin`: the built-in corpus of `framelm.builtin_corpus`.

Every record becomes a document with an `id` (the record's own, else the sha1 of its text), a
`source` (the `source_field`, else the input file's stem: `web` for `web.jsonl.gz`) and a
`split` drawn from a hash of the id and `split_seed` (`heldout`, `ref` or `train`). Bad
records are dropped and counted by reason; with `strict` the first one stops the run.
Exact duplicate texts are dropped when `dedup` is on. `sample_fraction` then keeps a random
subset drawn from another hash of the id, so a sample holds exactly those documents of a full
ingest, with the same splits (before `max_docs_per_input` caps it); `rejected` and
`duplicates_dropped` still count every record read.

Writes:
    RUN/ingest/documents/part-NNNNN.parquet (+ hidden .done marker)   id, source, split, text, n_chars, n_bytes
    RUN/ingest/rejects.jsonl                            {"reason", "file", "line", "detail"}
    RUN/ingest/plan.json                                shard size and input fingerprints

Resuming: the inputs are re-read in the same order (parsing is deterministic), shards whose
`.done` marker exists are not rewritten, so a killed and restarted run ends byte-identical to
an uninterrupted one. A plan that differs from the interrupted run's (other shard size or
changed input files) discards the old shards first.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import gzip
import hashlib
import io
import json
import logging
import os
import shutil
import zlib
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa

from framelm import fsutil
from framelm.builtin_corpus import DEFAULT_MAX_CHARS, builtin_fingerprint, iter_builtin_documents
from framelm.config import StageConfig, field
from framelm.errors import ConfigError, FramelmError
from framelm.progress import progress_bar
from framelm.rundir import RunDir

log = logging.getLogger("framelm")

BUILTIN = "builtin"
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
COMPRESSIONS = ("", ".gz", ".zst")
# Parquet row groups are the unit of work of `framelm tokenize`
ROWS_PER_GROUP = 512
BYTES_PER_GROUP = 1 << 20
SPLITS = ("heldout", "ref", "train")
# Below this many documents a split is too small a sample: the per-document held-out loss varies
# by several tenths of a nat, so its standard error over 50 documents is already ~0.05 nats, the
# size of typical schedule differences (compare's caution uses the same bound).
MIN_SPLIT_DOCS = 50
# Keys of a record listed when a field is missing from every record (a likely typo).
SHOWN_KEYS = 10
# Characters of a reject's detail quoted in the warning about an input that gave no documents.
SHOWN_DETAIL = 200


DOCUMENT_SCHEMA = pa.schema([
    ("id", pa.string()), ("source", pa.string()), ("split", pa.string()), ("text", pa.string()),
    ("n_chars", pa.int64()), ("n_bytes", pa.int64()),
])


@dataclasses.dataclass
class IngestConfig(StageConfig):
    inputs: list[str] = field(default_factory=lambda: [BUILTIN],
                              help="files, globs or directories to read, or 'builtin' for the built-in corpus")
    text_field: str = field("text", help="record key holding the document text")
    source_field: str | None = field(None, help="record key naming the document's source; unset or absent: the input file's stem")
    id_field: str = field("id", help="record key holding the document id (missing ids are the sha1 of the text)")
    dedup: bool = field(True, help="drop documents whose text exactly repeats an earlier one")
    strict: bool = field(False, help="stop at the first bad record instead of skipping and counting it")
    split_seed: int = field(0, help="seed of the id hash that assigns splits")
    heldout_fraction: float = field(0.02, help="share of documents in the 'heldout' split (never trained on)")
    ref_fraction: float = field(0.05, help="share of documents in the 'ref' split (trains the reference models)")
    builtin_max_chars: int = field(DEFAULT_MAX_CHARS, help="size cap of the 'builtin' corpus in characters")
    max_docs_per_input: int = field(0, help="keep at most this many documents of each input file (a .txt folder, a "
                                            "saved datasets folder and 'builtin' count as one), the first in reading order, and stop reading it "
                                            "there: a quick subset of a large corpus, not a random sample (see sample_fraction); 0 keeps all")
    sample_fraction: float = field(1.0, help="keep each document with this probability, drawn from a hash of its id "
                                             "and sample_seed (independent of the split hash), after dedup: a "
                                             "reproducible random subset of a large corpus; with max_docs_per_input, "
                                             "the first that many sampled documents; 1 keeps all")
    sample_seed: int = field(0, help="seed of the id hash that draws the sample (sample_fraction < 1)")
    docs_per_shard: int = field(4096, hash=False, help="documents per output Parquet file")

    def validate(self) -> None:
        if not self.inputs:
            raise ConfigError("'inputs' is empty; give at least one file, glob or directory, e.g. inputs: [data/*.jsonl.gz] or [builtin]")
        for name in ("heldout_fraction", "ref_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"'{name}' = {value} must be in [0, 1)")
        if self.heldout_fraction + self.ref_fraction >= 1.0:
            raise ConfigError(f"'heldout_fraction' + 'ref_fraction' = {self.heldout_fraction + self.ref_fraction} "
                              "leaves no documents for training; keep the sum below 1")
        for name in ("docs_per_shard", "builtin_max_chars"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"'{name}' = {getattr(self, name)} must be a positive integer")
        if not 0.0 < self.sample_fraction <= 1.0:
            raise ConfigError(f"'sample_fraction' = {self.sample_fraction} must be in (0, 1]; 1 keeps every document")
        if self.max_docs_per_input < 0:
            raise ConfigError(f"'max_docs_per_input' = {self.max_docs_per_input} must be 0 (keep all) or positive")
        for name in ("text_field", "id_field"):
            if not getattr(self, name):
                raise ConfigError(f"'{name}' must not be empty")

    def hashed_dict(self) -> dict[str, Any]:
        data = super().hashed_dict()
        if self.sample_fraction == 1.0:
            # no sample, as before sampling existed: a run ingested then stays up to date
            del data["sample_fraction"], data["sample_seed"]
        return data

    def input_fingerprint(self, run: RunDir) -> list[dict[str, Any]]:
        """Content identity of the inputs (enters the stage hash: changed bytes re-run ingest)."""
        return input_fingerprints(self, run)


# -- reading inputs ----------------------------------------------------------------------

@dataclasses.dataclass
class RawRecord:
    """One input record before checking: `value` is a parsed mapping or the reason it is not."""

    file: str
    line: int | None  # 1-based line (JSON lines) or row (Parquet, datasets); None for whole files
    value: dict[str, Any] | None
    default_source: str
    problem: tuple[str, str] | None = None  # (reason, detail) when the record could not be parsed
    # the file's columns where only some are read into `value` (Parquet), so a warning about a
    # missing field can name the columns the file really has
    columns: list[str] | None = None


def file_stem(path: Path) -> str:
    """`web` for web.jsonl.gz, web.parquet, web.jsonl."""
    name = _printable(path.name)  # a file name that is not UTF-8 still makes a writable source
    for comp in COMPRESSIONS[1:]:
        if name.endswith(comp):
            name = name[: -len(comp)]
    return Path(name).stem if Path(name).suffix else name


def _input_kind(path: Path) -> str | None:
    if path.is_dir():
        if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
            return "datasets"
        return "directory"
    name = path.name.lower()
    if name.endswith(".parquet"):
        return "parquet"
    if any(name.endswith(s + c) for s in JSONL_SUFFIXES for c in COMPRESSIONS):
        return "jsonl"
    return None


def resolve_inputs(inputs: list[str]) -> list[tuple[str, Path | None]]:
    """(kind, path) per input unit, in reading order; globs and directories expanded."""
    units: list[tuple[str, Path | None]] = []
    for spec in inputs:
        if spec == BUILTIN:
            units.append((BUILTIN, None))
            continue
        expanded = os.path.expanduser(spec)
        # a name that exists is itself, even with glob characters in it (`corpus [v2]/`)
        matches = sorted(glob.glob(expanded)) if glob.has_magic(spec) and not os.path.exists(expanded) else [expanded]
        if not matches or not Path(matches[0]).exists():
            raise FramelmError(f"ingest input '{spec}' matches no file or directory")
        for m in matches:
            path = Path(m)
            kind = _input_kind(path)
            if kind == "directory":
                units.extend(_directory_units(path))
            elif kind is None:
                raise FramelmError(
                    f"ingest input {path}: unknown format; expected .jsonl/.json/.ndjson (optionally .gz or .zst), "
                    ".parquet, a directory of .txt files, a datasets save_to_disk directory, or 'builtin'")
            else:
                units.append((kind, path))
    return units


def _directory_units(directory: Path) -> list[tuple[str, Path | None]]:
    files = sorted(p for p in directory.rglob("*") if p.is_file())
    units = [(k, p) for p in files if (k := _input_kind(p)) in ("jsonl", "parquet")]
    texts = [p for p in files if p.suffix == ".txt"]
    if texts and units:
        # One file per document or records in files: guessing would drop one kind silently.
        raise FramelmError(
            f"ingest input {directory}: mixes .txt files (e.g. {texts[0].relative_to(directory)}) with JSON-lines/Parquet "
            f"files (e.g. {units[0][1].relative_to(directory)}); give the record files or a folder of only .txt files as inputs")
    if texts:
        return [("textdir", directory)]
    if not units:
        raise FramelmError(f"ingest input {directory}: directory holds no .txt, JSON-lines or Parquet files "
                           "and is not a datasets save_to_disk directory")
    return units


class _CheckedZstdReader(io.RawIOBase):
    """Decompressed bytes of a .zst file, frame after frame. zstandard's own stream reader ends
    quietly where a truncated file stops mid-frame, which would drop the rest of the file
    unnoticed; this one raises ZstdError there, as gzip raises EOFError."""

    # small, because one call decompresses all it is given: a run of one character compresses
    # some 10,000-fold, so 4 KiB can still decompress to tens of MB
    READ_BYTES = 1 << 12

    def __init__(self, raw: io.BufferedIOBase):
        import zstandard

        self._zstd = zstandard
        self._raw = raw
        self._dctx = zstandard.ZstdDecompressor()
        self._frame: Any = None  # the decompressor of the frame being read; None between frames
        self._input = b""  # compressed bytes read past the end of the last frame
        self._output = memoryview(b"")

    def readable(self) -> bool:
        return True

    def _decompress_more(self) -> bool:
        data = self._input or self._raw.read(self.READ_BYTES)
        self._input = b""
        if not data:
            if self._frame is not None:
                raise self._zstd.ZstdError("the file ends inside a zstd frame")
            return False
        if self._frame is None:
            self._frame = self._dctx.decompressobj()
        self._output = memoryview(self._frame.decompress(data))
        if self._frame.eof:
            self._input = self._frame.unused_data
            self._frame = None
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._output:
            if not self._decompress_more():
                return 0
        n = min(len(buffer), len(self._output))
        buffer[:n] = self._output[:n]
        self._output = self._output[n:]
        return n

    def close(self) -> None:
        self._raw.close()
        super().close()


def _open_binary(path: Path) -> io.BufferedIOBase:
    name = path.name.lower()
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    if name.endswith(".zst"):
        return io.BufferedReader(_CheckedZstdReader(open(path, "rb")))
    return open(path, "rb")


def _read_jsonl(path: Path) -> Iterator[RawRecord]:
    stem = file_stem(path)
    line_no = 0
    try:
        with _open_binary(path) as fh:
            for line_no, raw in enumerate(fh, start=1):
                if line_no == 1:
                    raw = _strip_utf8_bom(path, raw)
                raw = raw.rstrip(b"\r\n")
                if not raw.strip():
                    continue  # blank lines separate nothing; they are not records
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    yield RawRecord(str(path), line_no, None, stem, ("undecodable_bytes", f"not UTF-8: {exc}"))
                    continue
                try:
                    value = json.loads(text)
                except (ValueError, RecursionError) as exc:
                    # ValueError beyond JSONDecodeError: an integer of more than 4300 digits;
                    # RecursionError: arrays or objects nested thousands deep
                    yield RawRecord(str(path), line_no, None, stem, ("invalid_json", str(exc)))
                    continue
                if not isinstance(value, dict):
                    yield RawRecord(str(path), line_no, None, stem, ("invalid_json", f"expected a JSON object, got {type(value).__name__}"))
                    continue
                yield RawRecord(str(path), line_no, value, stem)
    except _corrupt_data_errors(path) as exc:
        raise FramelmError(f"{path}: truncated, corrupt or unreadable after line {line_no} ({exc}); "
                           "re-download or re-compress it, or leave it out of the inputs") from None


UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff", b"\x00\x00\xfe\xff")  # UTF-32 little-endian starts as UTF-16's


def _strip_utf8_bom(path: Path, first_line: bytes) -> bytes:
    """The first line without the UTF-8 byte-order mark that Windows tools write. A UTF-16 (or
    UTF-32) file cannot be read line by line as bytes at all, so it stops the run, named."""
    if first_line.startswith(UTF16_BOMS):
        raise FramelmError(f"{path}: is UTF-16 or UTF-32 encoded (it starts with that byte-order mark); framelm reads "
                           "UTF-8 JSON lines; convert it to UTF-8 first (e.g. with iconv -f UTF-16 -t UTF-8)")
    return first_line.removeprefix(b"\xef\xbb\xbf")


def _corrupt_data_errors(path: Path) -> tuple[type[BaseException], ...]:
    """What reading a damaged file raises: gzip gives EOFError/OSError/zlib.error, zstd its own."""
    errors: tuple[type[BaseException], ...] = (EOFError, OSError, zlib.error)
    if path.name.lower().endswith(".zst"):
        import zstandard

        errors += (zstandard.ZstdError,)
    return errors


def _read_parquet(path: Path, cfg: IngestConfig) -> Iterator[RawRecord]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as exc:
        raise FramelmError(f"{path}: not a readable Parquet file ({exc})") from None
    names = pf.schema_arrow.names
    stem = file_stem(path)
    if cfg.text_field not in names:
        # only the configured columns are read, so the file's own are named here
        problem = ("missing_text", f"no '{cfg.text_field}' column (columns: {', '.join(names[:SHOWN_KEYS]) or 'none'})")
        for row in range(1, pf.metadata.num_rows + 1):
            yield RawRecord(str(path), row, None, stem, problem)
        return
    present = [c for c in (cfg.id_field, cfg.text_field, cfg.source_field) if c in names]
    columns = names[:SHOWN_KEYS]
    row = 0
    try:
        for batch in pf.iter_batches(columns=present, batch_size=4096):
            for value in batch.to_pylist():
                row += 1
                yield RawRecord(str(path), row, value, stem, columns=columns)
    except (OSError, pa.ArrowException) as exc:
        raise FramelmError(f"{path}: corrupt or unreadable after row {row} ({exc}); "
                           "re-download or re-write it, or leave it out of the inputs") from None


def _read_datasets(path: Path) -> Iterator[RawRecord]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:  # datasets raises many types for a damaged directory
        raise FramelmError(f"{path}: not a readable datasets save_to_disk directory ({exc})") from None
    if isinstance(loaded, datasets.DatasetDict):
        named = [(f"{path}[{split}]", loaded[split]) for split in sorted(loaded)]
    else:
        named = [(str(path), loaded)]
    for where, dataset in named:
        for row, value in enumerate(dataset, start=1):
            yield RawRecord(where, row, value, _printable(path.name))


def _read_textdir(directory: Path, text_field: str) -> Iterator[RawRecord]:
    for path in sorted(p for p in directory.rglob("*.txt") if p.is_file()):
        data = path.read_bytes()
        try:
            text = data.decode("utf-8-sig")  # a byte-order mark (Notepad writes one) is no part of the text
        except UnicodeDecodeError as exc:
            yield RawRecord(str(path), None, None, _printable(directory.name), ("undecodable_bytes", f"not UTF-8: {exc}"))
            continue
        yield RawRecord(str(path), None, {text_field: text}, _printable(directory.name))


def _read_builtin(cfg: IngestConfig) -> Iterator[RawRecord]:
    for doc in iter_builtin_documents(cfg.builtin_max_chars):
        yield RawRecord(doc.path, None, {cfg.text_field: doc.text, cfg.id_field: doc.id}, doc.source)


def read_records(kind: str, path: Path | None, cfg: IngestConfig) -> Iterator[RawRecord]:
    if kind == BUILTIN:
        return _read_builtin(cfg)
    assert path is not None
    if kind == "jsonl":
        return _read_jsonl(path)
    if kind == "parquet":
        return _read_parquet(path, cfg)
    if kind == "datasets":
        return _read_datasets(path)
    return _read_textdir(path, cfg.text_field)


def _unit_fingerprint(kind: str, path: Path | None, cfg: IngestConfig, hashes: fsutil.ContentHashes) -> dict[str, Any]:
    if kind == BUILTIN:
        return builtin_fingerprint(cfg.builtin_max_chars)
    assert path is not None
    if path.is_file():
        return hashes.fingerprint(path)
    # a directory: the fingerprints of its files, folded into one
    prints = [hashes.fingerprint(p) for p in sorted(p for p in path.rglob("*") if p.is_file())]
    digest = hashlib.sha256(json.dumps([(p["path"], p["sha256"]) for p in prints]).encode())
    return {"path": str(path), "files": len(prints), "bytes": sum(p["bytes"] for p in prints),
            "sha256": digest.hexdigest()}


def input_fingerprints(cfg: IngestConfig, run: RunDir) -> list[dict[str, Any]]:
    """Size and content hash of every input (folded per directory; 'builtin' by its files)."""
    with run.content_hashes() as hashes:
        return [_unit_fingerprint(kind, path, cfg, hashes) for kind, path in resolve_inputs(cfg.inputs)]


# -- checking records --------------------------------------------------------------------

def _printable(text: str) -> str:
    """`text` with lone surrogates (from a JSON key or a file name) escaped, so it can be written as UTF-8."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _unit_hash(doc_id: str, seed: int, purpose: bytes = b"") -> float:
    """A uniform number in [0, 1) that is a pure function of the id, the seed and the purpose."""
    digest = hashlib.blake2b(f"{seed}\x00{doc_id}".encode("utf-8", "surrogatepass"), digest_size=8, person=purpose).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def split_of(doc_id: str, seed: int, heldout_fraction: float, ref_fraction: float) -> str:
    """The split of a document: a pure function of its id and the seed, stable across runs."""
    u = _unit_hash(doc_id, seed)
    if u < heldout_fraction:
        return "heldout"
    if u < heldout_fraction + ref_fraction:
        return "ref"
    return "train"


def in_sample(doc_id: str, seed: int, fraction: float) -> bool:
    """Whether a document is in the sample. The hash is personalised, so that the sample is not
    correlated with the splits even when both seeds are equal (a 10 % sample drawn from the
    split's own hash would be the heldout and ref splits)."""
    return fraction >= 1.0 or _unit_hash(doc_id, seed, b"framelm-sample") < fraction


class FieldEvidence:
    """Per input, how many records were looked up for an optional field and how many lacked it
    (absent or empty), with the keys of the first that lacked it. A field missing from every
    record of an input is most likely a misspelt name, which ingest would otherwise paper over
    with a fallback (the file stem as source, the text hash as id)."""

    def __init__(self) -> None:
        self.checked: Counter[str] = Counter()
        self.missing: Counter[str] = Counter()
        self.first_missing: dict[str, tuple[str, list[str]]] = {}  # input -> (file, keys) of its first record without it

    def note(self, unit: str, rec: RawRecord, value: dict[str, Any], present: bool) -> None:
        self.checked[unit] += 1
        if present:
            return
        self.missing[unit] += 1
        if unit not in self.first_missing:
            keys = rec.columns if rec.columns is not None else [str(k) for k in list(value)[:SHOWN_KEYS]]
            self.first_missing[unit] = (rec.file, keys)

    def inputs_without(self) -> list[str]:
        """The inputs (in reading order) in none of whose checked records the field was found."""
        return [unit for unit in self.first_missing if self.missing[unit] == self.checked[unit]]


class RecordChecker:
    """Turns raw records into documents, remembering what it saw for dedup and id checks."""

    def __init__(self, cfg: IngestConfig):
        self.cfg = cfg
        self.text_seen: set[bytes] = set()
        self.id_text: dict[str, bytes] = {}
        self.rejects: list[dict[str, Any]] = []
        self.reject_counts: Counter[str] = Counter()
        self.duplicates_dropped = 0
        # the input unit being read (set by ingest_corpus): the key of the field evidence
        self.input = ""
        # records that reached the source / id lookup, and those without the field (they fall
        # back to the file stem / the text hash)
        self.source_evidence = FieldEvidence()
        self.id_evidence = FieldEvidence()

    def _reject(self, rec: RawRecord, reason: str, detail: str) -> None:
        if self.cfg.strict:
            where = f"{rec.file}, line {rec.line}" if rec.line is not None else rec.file
            raise FramelmError(f"{where}: bad record ({reason}): {detail}. "
                               "Fix the record, or run without --strict to skip and count bad records")
        self.reject_counts[reason] += 1
        self.rejects.append({"reason": reason, "file": _printable(rec.file), "line": rec.line, "detail": _printable(detail[:500])})

    def check(self, rec: RawRecord) -> dict[str, Any] | None:
        """The document of a record, or None when it is rejected or a dropped duplicate."""
        cfg = self.cfg
        if rec.problem:
            self._reject(rec, *rec.problem)
            return None
        value = rec.value or {}
        text = value.get(cfg.text_field)
        if text is None:
            self._reject(rec, "missing_text", f"no '{cfg.text_field}' field (keys: {', '.join(map(str, list(value)[:10]))})")
            return None
        if not isinstance(text, str):
            self._reject(rec, "non_string_text", f"'{cfg.text_field}' is {type(text).__name__}, not a string")
            return None
        if not text.strip():
            self._reject(rec, "empty_text", f"'{cfg.text_field}' is empty or whitespace only")
            return None
        try:
            encoded = text.encode("utf-8")
        except UnicodeEncodeError as exc:
            self._reject(rec, "undecodable_bytes", f"text has a lone surrogate, not valid Unicode: {exc}")
            return None
        source = rec.default_source
        if cfg.source_field:
            given = value.get(cfg.source_field)
            self.source_evidence.note(self.input, rec, value, given is not None and given != "")
            if given is not None and not isinstance(given, str):
                self._reject(rec, "non_string_source", f"'{cfg.source_field}' is {type(given).__name__}, not a string")
                return None
            if given and not _is_unicode(given):
                self._reject(rec, "undecodable_bytes", f"'{cfg.source_field}' has a lone surrogate, not valid Unicode")
                return None
            if given:
                source = given
        text_hash = hashlib.sha1(encoded).digest()
        raw_id = value.get(cfg.id_field)
        derived_id = raw_id is None or raw_id == ""
        self.id_evidence.note(self.input, rec, value, not derived_id)
        if derived_id:
            doc_id = text_hash.hex()
        elif isinstance(raw_id, int) and not isinstance(raw_id, bool):
            doc_id = str(raw_id)
        elif isinstance(raw_id, str):
            if not _is_unicode(raw_id):
                self._reject(rec, "undecodable_bytes", f"'{cfg.id_field}' has a lone surrogate, not valid Unicode")
                return None
            doc_id = raw_id
        else:
            self._reject(rec, "invalid_id", f"'{cfg.id_field}' is {type(raw_id).__name__}; ids must be strings or integers")
            return None
        if cfg.dedup and text_hash in self.text_seen:
            self.duplicates_dropped += 1
            return None
        earlier = self.id_text.get(doc_id)
        if earlier is not None:
            if earlier == text_hash and derived_id:
                # content-derived id of a kept duplicate (dedup off): make it unique but stable
                n = 2
                while f"{doc_id}-{n}" in self.id_text:
                    n += 1
                doc_id = f"{doc_id}-{n}"
            else:
                self._reject(rec, "duplicate_id", f"id {doc_id!r} was already used by an earlier document"
                             + (" with another text" if earlier != text_hash else ""))
                return None
        self.id_text[doc_id] = text_hash
        self.text_seen.add(text_hash)
        return {"id": doc_id, "source": source, "split": split_of(doc_id, cfg.split_seed, cfg.heldout_fraction, cfg.ref_fraction),
                "text": text, "n_chars": len(text), "n_bytes": len(encoded)}


# -- the stage ---------------------------------------------------------------------------

# What the later stages read of RUN/ingest/documents/ (a stray file beside the shards is not a shard)
DOCUMENT_GLOB = "part-*.parquet"


def shard_path(out_dir: Path, index: int) -> Path:
    return out_dir / f"part-{index:05d}.parquet"


def row_group_bounds(n_bytes: list[int]) -> list[int]:
    """Start rows of the row groups: at most ROWS_PER_GROUP documents and about
    BYTES_PER_GROUP bytes each, so `framelm tokenize` units are of similar cost."""
    starts, size = [0], 0
    for i, b in enumerate(n_bytes):
        if i > starts[-1] and (i - starts[-1] >= ROWS_PER_GROUP or size + b > BYTES_PER_GROUP):
            starts.append(i)
            size = 0
        size += b
    return starts


def _write_shard(path: Path, docs: list[dict[str, Any]]) -> None:
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(docs, schema=DOCUMENT_SCHEMA)
    starts = row_group_bounds([d["n_bytes"] for d in docs]) + [len(docs)]
    with fsutil.atomic_path(path) as tmp, pq.ParquetWriter(tmp, DOCUMENT_SCHEMA, compression="zstd") as writer:
        for start, end in zip(starts, starts[1:]):
            writer.write_table(table.slice(start, end - start), row_group_size=end - start)
    fsutil.mark_done(path)


def _prepare_plan(run: RunDir, plan: dict[str, Any]) -> None:
    """Keep finished shards only if they were made by the same plan; record the plan."""
    plan_path = run.path("ingest", "plan.json")
    docs_dir = run.path("ingest", "documents")
    if plan_path.exists() and fsutil.read_json(plan_path, "run ingest with --force to start over") != plan and docs_dir.exists():
        log.info("ingest: inputs or shard size changed since the interrupted run; starting over")
        shutil.rmtree(docs_dir)
    fsutil.write_json(plan_path, plan)


def _note_builtin(cfg: IngestConfig) -> None:
    """Say so when the built-in demo corpus is read: it is also what ingest reads without --inputs."""
    if BUILTIN in cfg.inputs:
        log.warning("ingest: ingesting the built-in demo corpus (Python standard library code, docstrings and licence "
                    "texts, at most builtin_max_chars=%s characters), the default when no --inputs are given; pass "
                    "--inputs FILES (or ingest.inputs in the config) to ingest your own data",
                    f"{cfg.builtin_max_chars:,}")


def _warn_missing_sources(cfg: IngestConfig, checker: RecordChecker) -> None:
    """A source field missing from records silently falls back to the file stem; say how often."""
    evidence = checker.source_evidence
    if not cfg.source_field or not evidence.first_missing:
        return
    field_name, missing, n_seen = cfg.source_field, sum(evidence.missing.values()), sum(evidence.checked.values())
    first_file, first_keys = next(iter(evidence.first_missing.values()))
    if len(evidence.inputs_without()) == len(evidence.checked):
        # missing everywhere: most likely a misspelt field name
        log.warning("ingest: source_field '%s' is missing or empty in all %d records, so every document's source is "
                    "its input file's stem; is the field name misspelt? The first record (%s) has the keys: %s",
                    field_name, missing, first_file, ", ".join(first_keys) or "none")
    else:
        log.warning("ingest: source_field '%s' is missing or empty in %d of %d records (first in %s); those documents "
                    "take their input file's stem as source", field_name, missing, n_seen, first_file)


def _warn_derived_ids(cfg: IngestConfig, checker: RecordChecker, units: list[tuple[str, Path | None]]) -> None:
    """Ids missing from every record of an input fall back to text hashes, and split_of hashes the
    id, so a wrong id_field also reshuffles the heldout/ref splits; say so. A .txt folder is left
    out: its documents have no fields, so no id to find."""
    evidence = checker.id_evidence
    textdirs = {_unit_name(kind, path) for kind, path in units if kind == "textdir"}
    without = [unit for unit in evidence.inputs_without() if unit not in textdirs]
    if cfg.id_field != IngestConfig.id_field:
        for unit in without:
            log.warning("ingest: id_field '%s' is in none of the %d records of %s, so their ids are derived from text "
                        "hashes (and their heldout/ref/train splits with them); is the field name misspelt? Its first "
                        "record has the keys: %s", cfg.id_field, evidence.checked[unit], unit,
                        ", ".join(evidence.first_missing[unit][1]) or "none")
        return
    # The default id_field: records without ids are normal, so only an id absent from every
    # record is worth a word (splits then depend on the text alone).
    if without and len(without) == len(set(evidence.checked) - textdirs):
        first_file, first_keys = evidence.first_missing[without[0]]
        log.warning("ingest: no record has an '%s' field (the default id_field), so every document's id is derived from "
                    "its text hash and the heldout/ref/train splits depend on the text; if the records carry ids under "
                    "another key, set id_field to it. The first record (%s) has the keys: %s",
                    cfg.id_field, first_file, ", ".join(first_keys) or "none")


def _unit_name(kind: str, path: Path | None) -> str:
    return BUILTIN if kind == BUILTIN else str(path)


@dataclasses.dataclass
class EmptyInput:
    """An input that gave no document, with what became of its records."""

    unit: str
    n_records: int
    rejects: list[dict[str, Any]]
    duplicates: int
    sampled_out: int


def _warn_empty_input(cfg: IngestConfig, empty: EmptyInput) -> None:
    """Say why an input gave no documents: beside other inputs the run succeeds, and its counts
    alone do not say which file lost its records. A warning, not an error: an input can
    legitimately be empty."""
    if empty.sampled_out:
        log.warning("ingest: input %s yielded no documents: none of its %d usable documents fell in the "
                    "sample_fraction = %g sample; raise sample_fraction to keep some", empty.unit, empty.sampled_out,
                    cfg.sample_fraction)
        return
    if not empty.n_records:
        why = "it holds no records"
    else:
        counts = Counter(r["reason"] for r in empty.rejects)
        first_detail: dict[str, str] = {}
        for r in empty.rejects:
            first_detail.setdefault(r["reason"], r["detail"][:SHOWN_DETAIL])
        dropped = [f"{reason}={n} (the first: {first_detail[reason]})" for reason, n in sorted(counts.items())]
        if empty.duplicates:
            dropped.append(f"duplicates_dropped={empty.duplicates} (exact repeats of earlier texts)")
        why = f"all {empty.n_records} of its records were rejected or dropped: {'; '.join(dropped)}"
    log.warning("ingest: input %s yielded no documents: %s; check text_field='%s' (the key or column that holds the "
                "text), or leave the file out of the inputs", empty.unit, why, cfg.text_field)


def _warn_small_splits(cfg: IngestConfig, splits: Counter[str]) -> None:
    """The held-out and reference splits are shares of the corpus; a small corpus leaves them tiny."""
    more = "raise sample_fraction" if cfg.sample_fraction < 1.0 else "ingest more data"
    for split, setting in (("heldout", "heldout_fraction"), ("ref", "ref_fraction")):
        if splits[split] < MIN_SPLIT_DOCS:
            log.warning("ingest: the '%s' split has only %d documents (%s=%s); results read on it rest on very few "
                        "documents; raise %s or %s (at least %d documents in the split are advisable)",
                        split, splits[split], setting, getattr(cfg, setting), setting, more, MIN_SPLIT_DOCS)


def ingest_corpus(cfg: IngestConfig, run: RunDir) -> dict[str, Any]:
    """Read every input into RUN/ingest/documents/part-*.parquet; return the counts."""
    units = resolve_inputs(cfg.inputs)
    _note_builtin(cfg)
    fingerprints = input_fingerprints(cfg, run)
    _prepare_plan(run, {"docs_per_shard": cfg.docs_per_shard, "inputs": fingerprints})
    out_dir = run.path("ingest", "documents")
    out_dir.mkdir(parents=True, exist_ok=True)

    checker = RecordChecker(cfg)
    sources: Counter[str] = Counter()
    splits: Counter[str] = Counter({s: 0 for s in SPLITS})
    n_docs = n_bytes = n_chars = sampled_out = 0
    shard: list[dict[str, Any]] = []
    n_shards = resumed = 0

    def flush() -> None:
        nonlocal n_shards, resumed
        path = shard_path(out_dir, n_shards)
        if fsutil.is_done(path):
            resumed += 1  # finished before an interruption: the same documents, already on disk
        else:
            _write_shard(path, shard)
        n_shards += 1
        shard.clear()

    # warned about after the run, not mid-progress-bar, and not when ingest fails altogether
    empty_inputs: list[EmptyInput] = []
    with progress_bar(desc="ingest", unit=" docs") as bar:
        for kind, path in units:
            checker.input = _unit_name(kind, path)
            kept = n_records = 0
            sampled_before = sampled_out
            first_reject, duplicates_before = len(checker.rejects), checker.duplicates_dropped
            with contextlib.closing(read_records(kind, path, cfg)) as records:
                for rec in records:
                    doc = checker.check(rec)
                    bar.update()
                    n_records += 1
                    if doc is None:
                        continue
                    if not in_sample(doc["id"], cfg.sample_seed, cfg.sample_fraction):
                        sampled_out += 1
                        continue
                    kept += 1
                    n_docs += 1
                    n_bytes += doc["n_bytes"]
                    n_chars += doc["n_chars"]
                    sources[doc["source"]] += 1
                    splits[doc["split"]] += 1
                    shard.append(doc)
                    if len(shard) == cfg.docs_per_shard:
                        flush()
                    if kept == cfg.max_docs_per_input:
                        break
            if not kept:
                empty_inputs.append(EmptyInput(checker.input, n_records, checker.rejects[first_reject:],
                                               checker.duplicates_dropped - duplicates_before,
                                               sampled_out - sampled_before))
    if shard:
        flush()
    if n_docs == 0:
        # rejects.jsonl is not written on failure, so the message carries the first reject's detail
        first = checker.rejects[0] if checker.rejects else None
        example = (f"; the first: {first['file']}" + (f", line {first['line']}" if first["line"] is not None else "")
                   + f": {first['detail']}") if first else ""
        if sampled_out:
            raise FramelmError(f"ingest: none of the {sampled_out} usable documents of {', '.join(cfg.inputs)} fell in "
                               f"the sample_fraction = {cfg.sample_fraction:g} sample; raise sample_fraction")
        raise FramelmError(f"ingest found no usable documents in {', '.join(cfg.inputs)} "
                           f"(rejected: {dict(checker.reject_counts) or 'none'}{example}); check text_field='{cfg.text_field}'")
    for empty in empty_inputs:
        _warn_empty_input(cfg, empty)
    _warn_missing_sources(cfg, checker)
    _warn_derived_ids(cfg, checker, units)
    _warn_small_splits(cfg, splits)
    fsutil.write_text(run.path("ingest", "rejects.jsonl"), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in checker.rejects))
    if resumed:
        log.info("ingest: %d of %d shards were already finished", resumed, n_shards)
    return {
        "docs": n_docs, "bytes": n_bytes, "chars": n_chars, "shards": n_shards,
        "rejected": sum(checker.reject_counts.values()), "duplicates_dropped": checker.duplicates_dropped,
        "sampled_out": sampled_out, "sources": dict(sorted(sources.items())), "splits": dict(splits),
        "rejects": dict(sorted(checker.reject_counts.items())), "inputs": fingerprints,
    }
