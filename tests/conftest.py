import os
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture
def shared_data() -> Path:
    """../shared/data beside the repo; tests that need it skip where a fresh clone has none."""
    if not (SHARED_DATA / "corpus").is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA} (only present on the project's own machines)")
    return SHARED_DATA
