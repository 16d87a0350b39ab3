"""bf16 in training (issue 14's cheaper steps on CPUs with AMX): the draft's autocast
(--autocast) and the target's forward when caching the training data (--cache-precision).

bf16 autocast also runs on a CPU without native bf16 (emulated, slowly), so these tests run
anywhere; `native_bf16` is patched where a test needs the trainer to believe either way.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import build_tiny_target
from test_training import settings_for, tiny_setup  # noqa: F401 (a fixture)
from vllm_chimera.checkpoint import load_draft
from vllm_chimera.training import TrainingSettings, train
from vllm_chimera.training import trainer
from vllm_chimera.commands.train import settings_from_args, train_parser
from vllm_chimera.training.data import CachedData, build_cache, cache_key

CPU = torch.device("cpu")


@pytest.fixture
def bf16_native(monkeypatch):
    monkeypatch.setattr(trainer, "native_bf16", lambda device: True)


def test_autocast_setting_per_device(monkeypatch):
    assert not trainer.autocast_enabled("off", CPU)
    assert not trainer.autocast_enabled("auto", CPU)  # the CPU stays fp32 unless asked
    monkeypatch.setattr(trainer, "native_bf16", lambda device: True)
    assert trainer.autocast_enabled("bf16", CPU)
    assert not trainer.autocast_enabled("auto", CPU)
    monkeypatch.setattr(trainer, "native_bf16", lambda device: False)
    with pytest.raises(ValueError, match="no native bf16"):
        trainer.autocast_enabled("bf16", CPU)
    with trainer.autocast_context(CPU, True):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with trainer.autocast_context(CPU, False):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


def test_bf16_autocast_trains_and_differs_from_fp32(tiny_setup, tmp_path, bf16_native):  # noqa: F811
    bf16 = train(settings_for(tiny_setup, tmp_path / "bf16", autocast="bf16"))
    fp32 = train(settings_for(tiny_setup, tmp_path / "fp32", autocast="off"))
    # It learns the pattern as fp32 does (test_training_learns_a_learnable_pattern's bar) ...
    assert min(bf16["validation"]["head_accuracy"]) > 0.7, bf16["validation"]
    assert bf16["settings"]["autocast"] == "bf16"
    # ... in bf16 arithmetic (the weights differ from fp32's), with fp32 master weights.
    a, b = load_draft(tmp_path / "bf16" / "draft"), load_draft(tmp_path / "fp32" / "draft")
    assert all(p.dtype == torch.float32 for p in a.parameters())
    assert any(not torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert abs(bf16["validation"]["head_accuracy"][0] - fp32["validation"]["head_accuracy"][0]) < 0.1


def test_bf16_cache_is_close_to_fp32_and_keyed_apart(tmp_path):
    target = build_tiny_target(tmp_path / "t", seed=3)
    g = torch.Generator().manual_seed(1)
    seqs = [(torch.randint(0, 128, (20 + i,), generator=g).tolist(), [1] * (20 + i)) for i in range(4)]
    fp32 = build_cache(target, seqs, tmp_path / "fp32", progress=False)
    bf16 = build_cache(target, seqs, tmp_path / "bf16", progress=False, precision="bf16")
    meta = json.loads((tmp_path / "bf16" / "meta.json").read_text())
    assert meta["precision"] == "bf16"
    h32, h16 = np.asarray(fp32.hidden, np.float32), np.asarray(bf16.hidden, np.float32)
    assert not np.array_equal(h32, h16)  # it did run in bf16 ...
    cosine = (h32 * h16).sum(-1) / np.linalg.norm(h32, axis=-1) / np.linalg.norm(h16, axis=-1)
    assert cosine.min() > 0.99  # ... and stays close
    assert (np.asarray(fp32.greedy) == np.asarray(bf16.greedy)).mean() > 0.8
    assert np.array_equal(fp32.tokens, bf16.tokens) and np.array_equal(fp32.mask, bf16.mask)
    with pytest.raises(ValueError, match="precision"):
        build_cache(target, seqs, tmp_path / "x", progress=False, precision="fp16")
    data = tmp_path / "d.jsonl"
    data.write_text("{}\n")
    key = cache_key(tmp_path / "t", data, 64, None)
    assert key == cache_key(tmp_path / "t", data, 64, None, "fp32")  # old caches stay valid
    assert key != cache_key(tmp_path / "t", data, 64, None, "bf16")


def test_a_bf16_cache_is_for_training_data_only(tiny_setup, tmp_path):  # noqa: F811
    settings = settings_for(tiny_setup, tmp_path / "run", cache_dir=str(tmp_path / "cache"),
                            cache_precision="bf16")
    _, _, train_data, val_data = trainer.load_target_and_data(settings, CPU)
    precision = lambda data: json.loads((data.folder / "meta.json").read_text())["precision"]  # noqa: E731
    assert isinstance(train_data, CachedData) and precision(train_data) == "bf16"
    assert precision(val_data) == "fp32"  # validation scores against fp32 labels


def test_resume_may_switch_precision(tiny_setup, tmp_path, bf16_native):  # noqa: F811
    """A run that continues on a machine without native bf16 (or with it) resumes."""
    common = dict(epochs=2, save_every=3)
    part = train(settings_for(tiny_setup, tmp_path / "run", stop_at_step=5, autocast="bf16", **common))
    assert part["steps"] == 5
    resumed = train(settings_for(tiny_setup, tmp_path / "run", autocast="off", **common))
    assert resumed["finished"] and resumed["steps"] == 16
    assert resumed["settings"]["autocast"] == "off"


@pytest.mark.parametrize("overrides, message", [
    (dict(autocast="fp16"), "autocast must be"),
    (dict(cache_precision="int8"), "cache_precision must be"),
])
def test_bad_precisions_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        TrainingSettings(target="t", train_data="d", output_dir="o", **overrides)


def test_the_cli_flags_reach_the_settings(tiny_setup, tmp_path):  # noqa: F811
    parser = train_parser()
    argv = ["--target", tiny_setup["target"], "--train-data", tiny_setup["train"],
            "--val-data", "none", "--output-dir", str(tmp_path)]
    default = settings_from_args(parser.parse_args(argv), parser)
    assert (default.autocast, default.cache_precision) == ("auto", "fp32")
    settings = settings_from_args(parser.parse_args(argv + ["--autocast", "bf16",
                                                            "--cache-precision", "bf16"]), parser)
    assert (settings.autocast, settings.cache_precision) == ("bf16", "bf16")
