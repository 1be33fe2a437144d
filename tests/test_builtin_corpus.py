import ast

import pytest

from framelm.builtin_corpus import iter_builtin_documents
from framelm.errors import FramelmError


def test_builtin_corpus_is_deterministic_capped_and_mixed():
    docs = list(iter_builtin_documents(max_chars=150_000))
    again = list(iter_builtin_documents(max_chars=150_000))
    assert docs == again
    assert sum(len(d.text) for d in docs) <= 150_000
    by_source = {s: [d for d in docs if d.source == s] for s in ("code", "docstring", "license")}
    assert all(by_source.values()), {s: len(v) for s, v in by_source.items()}
    assert len({d.id for d in docs}) == len(docs)
    for d in by_source["code"]:
        ast.parse(d.text)  # real Python source: complete top-level definitions
    # files are visited in sorted order
    code_paths = [d.path for d in by_source["code"]]
    assert code_paths == sorted(code_paths)
    assert all(d.text.strip() for d in docs)


def test_builtin_corpus_rejects_a_non_positive_cap():
    with pytest.raises(FramelmError, match="max_chars"):
        list(iter_builtin_documents(max_chars=0))


def test_fingerprint_changes_when_an_installed_licence_changes(tmp_path, monkeypatch):
    import framelm.builtin_corpus as bc

    licence = tmp_path / "LICENSE"
    licence.write_text("MIT")
    monkeypatch.setattr(bc, "_license_files", lambda: iter([(licence, "site/pkg-1.0.dist-info/LICENSE")]))
    before = bc.builtin_fingerprint(1000)
    licence.write_text("Apache-2.0")
    assert bc.builtin_fingerprint(1000) != before
