"""Built-in downstream tasks made from the run's own held-out documents.

A proxy model trained on a small corpus (the demo's is Python standard-library code,
docstrings and licence texts) sits at chance on general benchmarks, so framelm also measures
it on tasks cut from documents it never trained on (`split == "heldout"`), in the same row
schemas as any other task file (see framelm.evaltasks):

- `heldout_next_line` (multiple choice): a few lines of a document, then its true next line
  against three lines drawn from other held-out documents. Choices keep their leading newline
  and indentation, so they are joined to the context verbatim.
- `heldout_last_word` (LAMBADA style): prose from a document up to the last word of a
  paragraph; predict that word.

Generation is deterministic for a given seed and document set: documents are visited in id
order and every random choice comes from one seeded generator.

Reads: RUN/ingest/documents/part-*.parquet. Writes: RUN/eval/tasks/rows<rows>-seed<seed>/<task>.jsonl.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from framelm import fsutil
from framelm.errors import FramelmError
from framelm.ingest import DOCUMENT_GLOB
from framelm.rundir import RunDir

NEXT_LINE, LAST_WORD = "heldout_next_line", "heldout_last_word"

CONTEXT_LINES = 8  # lines of context before the line to predict
MIN_LINE_CHARS = 8  # shorter lines ("pass", "}") are too easy to confuse with distractors
MAX_CONTEXT_CHARS = 2000
MIN_PARAGRAPH_WORDS = 10
_PARAGRAPH = re.compile(r"(?:[^\n]|\n(?![ \t]*\n))+")  # text between blank lines
_WORD = re.compile(r"[A-Za-z]{3,}")
_TRAILING_PUNCT = ".,;:!?)\"'`"


def heldout_documents(run: RunDir) -> list[tuple[str, str]]:
    """(id, text) of every held-out document, sorted by id."""
    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    docs_dir = run.path("ingest", "documents")
    parts = sorted(docs_dir.glob(DOCUMENT_GLOB))
    if not parts:
        raise FramelmError(
            f"built-in tasks are cut from held-out documents, but {docs_dir} has no Parquet files; "
            f"run `framelm ingest --run-dir {run.root}` first, or name task files with --tasks"
        )
    table = ds.dataset(parts, format="parquet").to_table(columns=["id", "text"], filter=pc.field("split") == "heldout")
    rows = sorted(zip(table.column("id").to_pylist(), table.column("text").to_pylist()))
    if not rows:
        raise FramelmError(f"{docs_dir} has no documents with split == 'heldout' to build the built-in tasks from")
    return rows


def _tail(text: str, max_chars: int) -> str:
    """The end of `text`, at most `max_chars` long, starting at a word boundary when cut."""
    if len(text) <= max_chars:
        return text
    cut = text[-max_chars:]
    space = re.search(r"\s", cut)
    return cut[space.end():] if space else cut


def _interleave(per_doc: list[list], limit: int) -> list:
    """Round-robin over documents, so rows come from as many documents as possible."""
    out: list = []
    depth = 0
    while len(out) < limit and any(depth < len(c) for c in per_doc):
        out.extend(c[depth] for c in per_doc if depth < len(c))
        depth += 1
    return out[:limit]


def next_line_rows(docs: list[tuple[str, str]], rows: int, seed: int) -> list[dict]:
    """Multiple-choice rows: true next line of a document vs lines of other documents."""
    rng = random.Random(seed)
    candidates: list[list[tuple[int, int]]] = []  # per document: (doc index, line index)
    lines_of: list[list[str]] = []
    for d, (_, text) in enumerate(docs):
        lines = text.split("\n")
        lines_of.append(lines)
        picks = [(d, i) for i in range(2, len(lines))
                 if len(lines[i].strip()) >= MIN_LINE_CHARS and sum(bool(l.strip()) for l in lines[max(0, i - CONTEXT_LINES):i]) >= 2]
        rng.shuffle(picks)
        candidates.append(picks)
    chosen = _interleave(candidates, rows)
    pool = [(d, i) for picks in candidates for d, i in picks]
    if len({d for d, _ in pool}) < 2:  # distractors must come from another document
        return []
    out = []
    for d, i in chosen:
        true_line = lines_of[d][i]
        distractors: list[str] = []
        seen = {true_line.strip()}
        for _ in range(300):  # bounded: a pool of near-identical lines must not loop forever
            od, oi = pool[rng.randrange(len(pool))]
            line = lines_of[od][oi]
            if od != d and line.strip() not in seen:
                distractors.append(line)
                seen.add(line.strip())
                if len(distractors) == 3:
                    break
        if len(distractors) < 3:
            continue
        gold = rng.randrange(4)
        choices = ["\n" + line for line in distractors[:gold] + [true_line] + distractors[gold:]]
        context = _tail("\n".join(lines_of[d][max(0, i - CONTEXT_LINES):i]), MAX_CONTEXT_CHARS)
        out.append({"query": context, "choices": choices, "gold": gold, "doc_id": docs[d][0]})
    return out


def last_word_rows(docs: list[tuple[str, str]], rows: int, seed: int) -> list[dict]:
    """LAMBADA-style rows: text up to the last word of a prose paragraph, and that word."""
    rng = random.Random(seed + 1)
    candidates = []
    for d, (_, text) in enumerate(docs):
        picks = []
        for para in _PARAGRAPH.finditer(text):
            words = para.group().split()
            if len(words) < MIN_PARAGRAPH_WORDS or sum(bool(_WORD.fullmatch(w.strip(_TRAILING_PUNCT))) for w in words) < 0.7 * len(words):
                continue
            last = words[-1].rstrip(_TRAILING_PUNCT)
            if not _WORD.fullmatch(last):
                continue
            start = para.start() + len(para.group().rstrip()) - len(words[-1])
            # The harness scores " " + word after the context: only a word after one space reads
            # as the document does (not one after a line break of wrapped text).
            if text[start - 1] != " " or text[start - 2].isspace():
                continue
            picks.append((d, start, last))
        rng.shuffle(picks)
        candidates.append(picks)
    out = []
    for d, start, word in _interleave(candidates, rows):
        context = _tail(docs[d][1][:start - 1], MAX_CONTEXT_CHARS)
        out.append({"context": context, "continuation": word, "doc_id": docs[d][0]})
    return out


def write_builtin_tasks(run: RunDir, rows: int, seed: int) -> list[Path]:
    """Generate the built-in tasks into RUN/eval/tasks/rows<rows>-seed<seed>/; return the files that have rows."""
    docs = heldout_documents(run)
    # One folder per setting, so evaluations with other settings never overwrite these files.
    out_dir = run.path("eval", "tasks", f"rows{rows}-seed{seed}")
    paths = []
    for name, make in ((NEXT_LINE, next_line_rows), (LAST_WORD, last_word_rows)):
        task_rows = make(docs, rows, seed)
        if not task_rows:
            continue
        path = out_dir / f"{name}.jsonl"
        fsutil.write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in task_rows))
        paths.append(path)
    if not paths:
        raise FramelmError(f"the {len(docs)} held-out documents yield no rows for the built-in tasks; name task files with --tasks")
    return paths
