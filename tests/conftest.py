"""Shared test setup: offline hub, the local data directory, a one-thread torch for small-tensor modules. Shared
models and helpers are in ``tiny_models.py``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

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


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of small-tensor tests: OpenMP threads would only add barrier waits (slow on a
    busy machine). Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
