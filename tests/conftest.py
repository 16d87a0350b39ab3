"""Shared fixtures: tiny random Llama targets built from a config in a temporary folder."""
from __future__ import annotations

import os

import pytest
import torch

from vllm_chimera.toy import (build_permutation_pair, build_random_draft,  # noqa: F401 (re-exported)
                              build_tiny_target, build_vllm_target, save_word_tokenizer)


@pytest.fixture(scope="session", autouse=True)
def empty_chimera_cache(tmp_path_factory):
    """Every test sees an empty project cache of its own (CHIMERA_CACHE_DIR), never the
    user's ~/.cache/vllm-chimera: a test that needs a prepared target or data split must
    prepare it (or build a tiny one) itself, so the suite passes on a fresh machine."""
    previous = os.environ.get("CHIMERA_CACHE_DIR")
    os.environ["CHIMERA_CACHE_DIR"] = str(tmp_path_factory.mktemp("chimera_cache"))
    yield
    if previous is None:
        del os.environ["CHIMERA_CACHE_DIR"]
    else:
        os.environ["CHIMERA_CACHE_DIR"] = previous


@pytest.fixture(scope="session")
def tiny_target(tmp_path_factory):
    return build_tiny_target(tmp_path_factory.mktemp("tiny_target"))


@pytest.fixture(scope="session")
def tiny_draft(tiny_target):
    return build_random_draft(tiny_target, num_heads=5)


@pytest.fixture
def prompts():
    g = torch.Generator().manual_seed(123)
    return [torch.randint(0, 128, (n,), generator=g) for n in (1, 5, 17)]
