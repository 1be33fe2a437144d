"""A small built-in corpus gathered from the local Python installation, with no download.

It lets the whole pipeline run on any machine with CPython 3.11+ and nothing else:

- `code`: standard-library `.py` files, one document per top-level class or function (with its
  decorators), so documents range from a few lines to a few hundred, as in a real corpus;
- `docstring`: the module, class and function docstrings of those files, one prose document
  per module (docstrings joined by blank lines);
- `license`: licence and readme texts of the installation (the standard library's
  `LICENSE.txt` and READMEs, and the licence files in installed packages' `*.dist-info`).

Files are visited in sorted path order and each source is filled up to its share of
`max_chars`, so the same installation always gives the same documents. Test suites and
files larger than `MAX_FILE_CHARS` are skipped (one huge generated file would otherwise fill
a share). Reads files only; writes nothing.
"""

from __future__ import annotations

import ast
import dataclasses
import os
import sysconfig
from pathlib import Path
from typing import Iterator

from framelm.errors import FramelmError

DEFAULT_MAX_CHARS = 3_000_000
LICENSE_SHARE = 0.15  # at most this share goes to licence texts; what they leave goes to code and docstrings
CODE_SHARE_OF_REST = 0.7
MAX_FILE_CHARS = 100_000
MIN_DOCSTRING_DOC_CHARS = 200
SKIPPED_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__", "dist-packages"}
LICENSE_PREFIXES = ("license", "licence", "copying", "readme", "notice", "authors")
LICENSE_SUFFIXES = {"", ".txt", ".md", ".rst"}


@dataclasses.dataclass(frozen=True)
class BuiltinDocument:
    id: str
    source: str  # "code", "docstring" or "license"
    text: str
    path: str  # the file it came from


def _stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _site_dirs() -> list[Path]:
    paths = sysconfig.get_paths()
    return sorted({Path(paths[k]) for k in ("purelib", "platlib") if Path(paths[k]).is_dir()})


def _walk_sorted(root: Path) -> Iterator[Path]:
    """Files under root in sorted path order, skipping test suites and caches."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIPPED_DIRS and not d.startswith("."))
        for name in sorted(filenames):
            yield Path(dirpath) / name


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None  # unreadable or not UTF-8: not part of the corpus


def _is_license_file(path: Path) -> bool:
    name = path.name.lower()
    return name.startswith(LICENSE_PREFIXES) and path.suffix.lower() in LICENSE_SUFFIXES


def _license_files() -> Iterator[tuple[Path, str]]:
    """(file, id prefix) of licence/readme texts: stdlib first, then installed distributions."""
    stdlib = _stdlib_dir()
    for path in _walk_sorted(stdlib):
        if _is_license_file(path):
            yield path, "stdlib/" + path.relative_to(stdlib).as_posix()
    for site in _site_dirs():
        for dist in sorted(site.glob("*.dist-info")):
            for path in _walk_sorted(dist):
                if _is_license_file(path):
                    yield path, "site/" + path.relative_to(site).as_posix()


def _docstrings(code: str) -> list[str]:
    """Docstrings of the module and of the classes and functions defined directly in module,
    class or function bodies, in source order (walking statements only, not expressions, is
    what keeps this fast)."""
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError):
        return []
    found: list[str] = []

    def visit(node: ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        doc = ast.get_docstring(node, clean=True)
        if doc and doc.strip():
            found.append(doc)
        for child in node.body:
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(child)

    visit(tree)
    return found


MIN_CODE_DOC_CHARS = 120


def _definitions(code: str) -> list[tuple[str, str]]:
    """(name, source) of each top-level class and function definition, in source order."""
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError):
        return []
    lines = code.splitlines(keepends=True)
    out = []
    for node in tree.body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno:
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            text = "".join(lines[first - 1:node.end_lineno])
            if len(text) >= MIN_CODE_DOC_CHARS:
                out.append((node.name, text))
    return out


def iter_builtin_documents(max_chars: int = DEFAULT_MAX_CHARS) -> Iterator[BuiltinDocument]:
    """The built-in corpus, at most `max_chars` characters in total, in a fixed order."""
    if max_chars <= 0:
        raise FramelmError(f"builtin corpus: max_chars must be positive, got {max_chars}")
    license_budget = int(max_chars * LICENSE_SHARE)
    used_license = 0
    for path, rel in _license_files():
        text = _read_text(path)
        if not text or not text.strip() or len(text) > license_budget - used_license:
            continue
        used_license += len(text)
        yield BuiltinDocument(id=f"builtin:license:{rel}", source="license", text=text, path=str(path))

    rest = max_chars - used_license
    budget = {"code": int(rest * CODE_SHARE_OF_REST)}
    budget["docstring"] = rest - budget["code"]
    used = {"code": 0, "docstring": 0}
    stdlib = _stdlib_dir()
    n_code = 0
    for path in _walk_sorted(stdlib):
        if all(budget[s] - used[s] < MIN_DOCSTRING_DOC_CHARS for s in budget):
            break
        if path.suffix != ".py":
            continue
        code = _read_text(path)
        if not code or not code.strip() or len(code) > MAX_FILE_CHARS:
            continue
        rel = path.relative_to(stdlib).as_posix()
        for name, text in _definitions(code):
            if len(text) > budget["code"] - used["code"]:
                break
            used["code"] += len(text)
            n_code += 1
            yield BuiltinDocument(id=f"builtin:code:{rel}:{name}", source="code", text=text, path=str(path))
        if budget["docstring"] - used["docstring"] >= MIN_DOCSTRING_DOC_CHARS:
            prose = "\n\n".join(_docstrings(code))
            if len(prose) >= MIN_DOCSTRING_DOC_CHARS and len(prose) <= budget["docstring"] - used["docstring"]:
                used["docstring"] += len(prose)
                yield BuiltinDocument(id=f"builtin:docstring:{rel}", source="docstring", text=prose, path=str(path))
    if n_code == 0:
        raise FramelmError(
            f"builtin corpus: found no readable standard-library .py files under {stdlib}; "
            "this Python installation ships compiled files only, so give your own corpus to ingest instead"
        )


def builtin_fingerprint(max_chars: int = DEFAULT_MAX_CHARS) -> dict[str, str | int]:
    """Identity of the built-in corpus on this installation (recorded like an input file's).

    The standard library is identified by the Python version; the licence texts of installed
    packages by their contents, since installing or upgrading a package changes them.
    """
    import hashlib
    import sys

    licences = hashlib.sha256()
    for path, doc_id in _license_files():
        text = _read_text(path)  # what the corpus reads (None: skipped there too)
        licences.update(doc_id.encode() + b"\0" + hashlib.sha256((text or "").encode()).digest())
    return {"path": "builtin", "python": sys.version.split()[0], "stdlib": str(_stdlib_dir()), "max_chars": max_chars,
            "licences_sha256": licences.hexdigest()}
