"""Chimera on several vLLM workers: tensor parallel 2 over the multiprocess backend."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import build_permutation_pair
from vllm_chimera.checkpoint import save_draft

pytestmark = pytest.mark.slow
SCRIPT = Path(__file__).parent / "scripts" / "run_parallel.py"
# Two CPU workers, one core each: how vLLM on CPU runs tensor parallel 2 (one OpenMP thread
# set per worker, no core reserved for the front end).
PARALLEL_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "0|1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}


def _run(target, draft, backend, tp, extra_env):
    env = {**os.environ, **PARALLEL_ENV, **(extra_env or {})}
    done = subprocess.run([sys.executable, str(SCRIPT), str(target), str(draft), backend, str(tp)],
                          env=env, capture_output=True, text=True, timeout=900)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stdout[-2000:] + done.stderr[-4000:]
    return json.loads(lines[-1][len("RESULT "):])


def run_parallel(target, draft, backend, tp, extra_env=None):
    """Plain and Chimera runs, each in a fresh process: {"plain": ..., "chimera": ...}."""
    return {"plain": _run(target, "none", backend, tp, extra_env),
            "chimera": _run(target, draft, backend, tp, extra_env)}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("parallel")
    _, draft, _ = build_permutation_pair(folder, num_heads=4, num_wrong=32)
    save_draft(draft, folder / "draft")
    return folder / "target", folder / "draft"


def test_tensor_parallel_2_multiprocess(pair):
    result = run_parallel(*pair, backend="mp", tp=2)
    assert result["chimera"]["token_ids"] == result["plain"]["token_ids"]
    assert result["chimera"]["drafts"] > 0 and result["chimera"]["accepted"] > 0


def test_tensor_parallel_2_ray_executor(pair):
    """vLLM's Ray executor with two Ray actors as TP workers; the plugin loads in each.

    On CPU vLLM refuses Ray, so tests/shims/ray_cpu.py gives the CPU platform a Ray
    resource (test-only); the executor, the actors and the plugin are the real ones.
    """
    pytest.importorskip("ray")
    shims = str(Path(__file__).parent / "shims")
    result = run_parallel(*pair, backend="ray", tp=2, extra_env={
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # the engine core shares the driver's Ray
        "PYTHONPATH": os.pathsep.join([shims, os.environ.get("PYTHONPATH", "")])})
    assert result["chimera"]["token_ids"] == result["plain"]["token_ids"]
    assert result["chimera"]["drafts"] > 0 and result["chimera"]["accepted"] > 0
