"""The CPU engine's malloc settings (core/runner/host_allocator.py): set once on glibc, said
in the backend choice's log line, and left alone when turned off."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest
from transformers import LlamaConfig

from batchrun.core.engine.config import EngineConfig
from batchrun.core.engine.engine import build_engine
from batchrun.core.runner.model_loader import load_model

from helpers import COMMON, save_tiny_model

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
CALL = "from batchrun.core.runner.host_allocator import keep_freed_host_memory as k; print(k())"


def in_fresh_process(**env: str) -> str:
    """What ``keep_freed_host_memory`` returns in a new Python (it acts once per process)."""
    base = {k: v for k, v in os.environ.items() if k != "BATCHRUN_KEEP_FREED_MEMORY"}
    done = subprocess.run([sys.executable, "-c", CALL], capture_output=True, text=True, env=base | env)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.mark.skipif(not GLIBC, reason="glibc's mallopt")
def test_sets_glibc_thresholds_and_says_so():
    assert "mmap threshold 32 MiB" in in_fresh_process()


def test_turned_off_by_the_environment():
    assert in_fresh_process(BATCHRUN_KEEP_FREED_MEMORY="0") == "None"


@pytest.mark.skipif(not GLIBC, reason="glibc's mallopt")
def test_the_cpu_engine_reports_it(tmp_path):
    path = save_tiny_model(LlamaConfig(**COMMON), tmp_path / "model")
    loaded = load_model(path, device="cpu", dtype="float32")
    engine = build_engine(loaded, EngineConfig(kv_cache_bytes=1 << 22))
    assert "freed activations kept for reuse" in engine.info.attention_backend_choice
