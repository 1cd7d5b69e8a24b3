"""Shared fixtures and the ``gpu`` marker (skipped without CUDA); helpers live in helpers.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import TINY_LLAMA


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_llama() -> Path:
    return TINY_LLAMA
