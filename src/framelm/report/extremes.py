"""The documents at both ends of the perplexity axis, with the start of their text.

The highest-PPL documents are often not prose at all (encoded attachments, tables, spam) and the
lowest boilerplate repeated many times; either kind can make a loss spike or fill a stage, and
no plot of the score distribution shows what they are. Reads score/scores.parquet with its
labels, and the texts of just those documents from ingest/documents/.
"""

from __future__ import annotations

import html
from typing import Any

from framelm.ingest import DOCUMENT_GLOB
from framelm.labels import labelled_sql
from framelm.report.config import ReportConfig
from framelm.report.page import count_text, fmt_number, html_table
from framelm.rundir import RunDir
from framelm.sql import sql_str

EXCERPT_CHARS = 120


def _excerpt(text: str | None) -> str:
    if text is None:
        return "(text not in ingest/documents)"
    flat = " ".join(text.split())  # one line per row: newlines and runs of spaces as one space
    return flat[:EXCERPT_CHARS] + ("…" if len(flat) > EXCERPT_CHARS else "")


def extremes_table(cfg: ReportConfig, run: RunDir, con: Any) -> str | None:
    """An HTML table of the `cfg.extreme_docs` highest- and lowest-PPL documents (None when off)."""
    if not cfg.extreme_docs:
        return None
    labelled = labelled_sql(run)
    ends = {}
    for end, order in (("highest", "DESC"), ("lowest", "ASC")):
        ends[end] = con.execute(
            f"SELECT id, source, split, quadrant, n_tokens, ppl, pd FROM {labelled} "
            f"WHERE ppl > 0 AND isfinite(ppl) AND isfinite(pd) ORDER BY ppl {order}, id LIMIT {int(cfg.extreme_docs)}").fetchall()
    ids = sorted({row[0] for rows in ends.values() for row in rows})
    texts: dict[str, str] = {}
    documents = run.path("ingest", "documents")
    if ids and any(documents.glob(DOCUMENT_GLOB)):
        wanted = ", ".join(sql_str(i) for i in ids)
        texts = dict(con.execute(
            f"SELECT id, left(text, {4 * EXCERPT_CHARS}) FROM read_parquet({sql_str(str(documents / DOCUMENT_GLOB))}) "
            f"WHERE id IN ({wanted})").fetchall())
    body = [[end, html.escape(str(doc_id)), html.escape(str(source)), html.escape(str(split)), html.escape(str(quadrant)),
             count_text(n_tokens), fmt_number(ppl), fmt_number(pd), html.escape(_excerpt(texts.get(doc_id)))]
            for end, rows in ends.items() for doc_id, source, split, quadrant, n_tokens, ppl, pd in rows]
    if not body:
        return None
    return html_table(
        ["PPL end", "id", "source", "split", "quadrant", "tokens", "PPL", "PD", "text (start)"], body,
        f"The {cfg.extreme_docs} highest- and lowest-perplexity documents: the highest are often not prose "
        f"(encoded files, tables, spam) and the lowest repeated boilerplate; a long one can make a loss spike "
        f"wherever its stage puts it, and a 'cells' selection (perplexity band) leaves such documents out")
