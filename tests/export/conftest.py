"""The `tiny_run` fixture; the builder and helpers live in export_fixtures.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from export_fixtures import TinyRun, build_tiny_run


@pytest.fixture
def tiny_run(tmp_path: Path) -> TinyRun:
    return build_tiny_run(tmp_path / "run")
