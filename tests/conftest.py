"""Shared fixtures, the ``gpu`` marker (skipped without CUDA) and Triton's interpreter on
machines without a GPU; helpers live in helpers.py."""

from __future__ import annotations

import os
from pathlib import Path

# Without a GPU, Triton kernels run in Triton's interpreter. TRITON_INTERPRET must be set
# before Triton is first imported (torch and transformers may import it): so here, before
# anything else, keyed on the NVIDIA device node rather than on torch.
if not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

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
