"""The HTML: a section's parts, the fragments sections build (tables, cautions, numbers), and the page."""

from __future__ import annotations

import dataclasses
import html
from typing import Any

from framelm.report.records import is_number
from framelm.rundir import RunDir


@dataclasses.dataclass
class Image:
    file: str  # a PNG in RUN/report/
    caption: str  # HTML: whoever builds it escapes the run's names in it


@dataclasses.dataclass
class Section:
    title: str
    anchor: str
    missing: str | None = None  # set when the inputs are absent: what to run first
    blocks: list[str] = dataclasses.field(default_factory=list)  # HTML fragments before the figures
    images: list[Image] = dataclasses.field(default_factory=list)


def not_run(title: str, anchor: str, what: str, command: str) -> Section:
    return Section(title, anchor, missing=f"not run yet: {what} (run <code>{html.escape(command)}</code>)")


def caution(note: str) -> str:
    """A caution line of compare's or the report's own ("caution: ...") as an HTML paragraph."""
    return f"<p class=\"caution\">{html.escape(note[0].upper() + note[1:])}.</p>"


def count_text(x: Any) -> str:
    return f"{x:,}" if isinstance(x, int) and not isinstance(x, bool) else "n/a"


def fmt_number(x: Any, digits: int = 4) -> str:
    return f"{x:.{digits}g}" if is_number(x) else "n/a"


CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1100px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 2em; }
nav a { margin-right: 1em; } .meta { color: #666; }
.verdict { background: #f5f7fa; border-left: 4px solid #4C72B0; padding: .6em 1em; }
.verdict li { font-family: ui-monospace, monospace; }
.missing, .caution { color: #8a6d3b; background: #fcf8e3; padding: .5em 1em; }
figure { margin: 1.2em 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #444; font-size: .92em; margin-top: .3em; }
table { border-collapse: collapse; font-size: .9em; margin: 1em 0; }
th, td { border: 1px solid #ddd; padding: .25em .6em; text-align: right; }
th { background: #f0f0f0; }
td:first-child, td:nth-child(2), th:first-child, th:nth-child(2) { text-align: left; }
caption { caption-side: top; text-align: left; color: #444; padding-bottom: .3em; }
"""


def html_table(header: list[str], rows: list[list[str]], caption: str) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><caption>{html.escape(caption)}</caption><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_page(title: str, run: RunDir, sections: list[Section], verdicts: list[str], stale: list[str]) -> str:
    from framelm import __version__

    parts = [f"<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>{html.escape(title)}</title>",
             f"<style>{CSS}</style>\n</head>\n<body>", f"<h1>{html.escape(title)}</h1>",
             f"<p class=\"meta\">Run directory <code>{html.escape(run.root.name)}</code>, framelm {html.escape(__version__)}.</p>",
             "<nav>" + "".join(f"<a href=\"#{s.anchor}\">{html.escape(s.title)}</a>" for s in sections) + "</nav>"]
    if verdicts:
        items = "".join(f"<li>{html.escape(v)}</li>" for v in verdicts)
        parts.append(f"<div class=\"verdict\"><b>Verdict</b><ul>{items}</ul></div>")
    parts.extend(caution(note) for note in stale)
    pending = [s.title for s in sections if s.missing]
    if pending:
        parts.append(f"<p class=\"missing\">Sections not run yet: {html.escape(', '.join(pending))}.</p>")
    for s in sections:
        parts.append(f"<section id=\"{s.anchor}\">\n<h2>{html.escape(s.title)}</h2>")
        if s.missing:
            parts.append(f"<p class=\"missing\">{s.missing}</p>")
        parts.extend(s.blocks)
        for img in s.images:
            parts.append(f"<figure><img src=\"{html.escape(img.file)}\" alt=\"{html.escape(img.file)}\">"
                         f"<figcaption>{img.caption}</figcaption></figure>")
        parts.append("</section>")
    parts.append("</body>\n</html>\n")
    return "\n".join(parts)
