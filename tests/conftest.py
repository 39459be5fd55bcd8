"""Shared test setup: offline hub, local data directory, tiny models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("NEUQI_DATA_DIR", REPO.parent / "shared" / "data"))
os.environ.setdefault("NEUQI_DATA_DIR", str(DATA_DIR))


@pytest.fixture
def data_dir() -> Path:
    if not DATA_DIR.is_dir():
        pytest.skip(f"evaluation data not found at {DATA_DIR} (set NEUQI_DATA_DIR)")
    return DATA_DIR
