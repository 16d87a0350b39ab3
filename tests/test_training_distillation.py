"""Distillation beyond the argmax label (issue 14): KL from the target's next-token
distribution (--kl-weight, Medusa-2's) and the regression of each head's state onto the
target's h_{t+1+i} (--regression-weight, EAGLE's), for Chimera's and Medusa's heads."""
from __future__ import annotations

import json

import pytest
import torch

from test_training import settings_for, tiny_setup  # noqa: F401 (a fixture)
from vllm_chimera.checkpoint import load_draft
from vllm_chimera.training import TrainingSettings, train
from vllm_chimera.commands.train import settings_from_args, train_parser
from vllm_chimera.training.loss import IGNORE, batch_labels, next_hidden_states
from vllm_chimera.training.trainer import build_draft, build_loss, load_target_and_data

CPU = torch.device("cpu")


def test_next_hidden_states_worked_example():
    # L = 5 positions, hidden[b, t] = 10 b + t; head i at t reads h_{t+1+i} (clamped at L-1).
    hidden = (torch.arange(5.0)[None, :, None] + 10 * torch.arange(2.0)[:, None, None]).expand(2, 5, 3)
    selected = torch.tensor([[True, False, True, True], [False, True, False, False]])  # [B, L-1]
    got = next_hidden_states(hidden, selected, num_heads=2)  # [K=2, P=4, d=3]
    assert got.shape == (2, 4, 3)
    # Selected (b, t): (0, 0), (0, 2), (0, 3), (1, 1).
    assert got[0, :, 0].tolist() == [1, 3, 4, 12]  # h_{t+1}
    assert got[1, :, 0].tolist() == [2, 4, 4, 13]  # h_{t+2}; (0, 3) has no h_5: h_4 repeated


def _loss_and_batch(setup, tmp_path, draft_kind="chimera", **overrides):
    settings = settings_for(setup, tmp_path, draft_kind=draft_kind, **overrides)
    target, _, train_data, _ = load_target_and_data(settings, CPU)
    draft = build_draft(settings, target, train_data)
    with torch.no_grad():  # trained-looking heads (their output layers start at zero)
        for p in draft.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    return build_loss(settings, draft), train_data.batch([0, 1, 2, 3], CPU), settings


CASES = [
    ("chimera", {}),
    ("chimera", {"draft_overrides": {"draft_vocab_size": 48}}),
    ("medusa", {"draft_overrides": {"shared_lm_head": True}}),
]


@pytest.mark.parametrize("draft_kind, extra", CASES)
def test_both_terms_are_zero_for_a_draft_that_copies_the_target(tiny_setup, tmp_path, monkeypatch,  # noqa: F811
                                                                draft_kind, extra):
    loss_module, batch, settings = _loss_and_batch(tiny_setup, tmp_path, draft_kind,
                                                   kl_weight=1.0, regression_weight=1.0, **extra)
    if draft_kind == "chimera" and "draft_overrides" in extra:  # the reduced head as the target's rows
        draft = loss_module.draft
        with torch.no_grad():
            draft.draft_lm_head.weight.copy_(draft._target_lm_head[draft.draft_to_target_ids])
    # A draft whose every head state IS the target's next hidden state.
    monkeypatch.setattr(type(loss_module), "head_states",
                        lambda self, tokens, hidden, selected, greedy: next_hidden_states(
                            hidden, selected, self.num_heads))
    _, stats = loss_module(batch)  # [K, 5]
    assert stats[:, 2].min() > 0  # every head has labels
    torch.testing.assert_close(stats[:, 3], torch.zeros(settings.num_heads), atol=1e-4, rtol=0)
    torch.testing.assert_close(stats[:, 4], torch.zeros(settings.num_heads), atol=1e-6, rtol=0)
    # The copying draft also predicts every label right (the label is that state's argmax),
    # but for labels outside a reduced draft vocabulary.
    labels = batch_labels(batch, settings.loss_on, settings.num_heads)
    labels = labels[:, (labels != IGNORE).any(0)]  # [K, P]
    reachable = (loss_module.train_labels(labels) != IGNORE).sum(-1).float()  # [K]
    assert torch.equal(stats[:, 1], reachable) and reachable.sum() > 0.9 * stats[:, 2].sum()


@pytest.mark.parametrize("draft_kind, extra", CASES)
def test_the_terms_add_to_the_loss_as_weighted(tiny_setup, tmp_path, draft_kind, extra):  # noqa: F811
    plain, batch, settings = _loss_and_batch(tiny_setup, tmp_path / "a", draft_kind, **extra)
    both, _, _ = _loss_and_batch(tiny_setup, tmp_path / "b", draft_kind, kl_weight=0.5,
                                 regression_weight=2.0, **extra)
    both.draft.load_state_dict(plain.draft.state_dict())
    loss0, stats0 = plain(batch)
    loss1, stats1 = both(batch)
    torch.testing.assert_close(stats1[:, :3], stats0[:, :3])  # CE, hits, counts unchanged
    assert (stats1[:, 3] > 0).all() and (stats1[:, 4] > 0).all()
    counts, weights = stats1[:, 2], torch.tensor(settings.weights())
    extra_loss = (weights * (0.5 * stats1[:, 3] + 2.0 * stats1[:, 4]) / counts).sum()
    torch.testing.assert_close(loss1 - loss0, extra_loss, atol=1e-4, rtol=1e-4)
    summary = both.summarize(stats1)
    assert len(summary["head_kl"]) == len(summary["head_regression"]) == settings.num_heads
    assert "head_kl" not in plain.summarize(stats0)
    # Each term alone moves the heads (it has a gradient of its own).
    for name in ("kl_weight", "regression_weight"):
        one, _, _ = _loss_and_batch(tiny_setup, tmp_path / name, draft_kind, **{name: 1.0}, **extra)
        one.draft.load_state_dict(plain.draft.state_dict())
        one.zero_grad(), plain.zero_grad()
        one(batch)[0].backward()
        plain(batch)[0].backward()
        assert any(not torch.allclose(p.grad, q.grad) for p, q in
                   zip(one.draft.parameters(), plain.draft.parameters()) if p.grad is not None), name


def test_the_kl_reads_the_target_distribution_over_the_draft_vocabulary(tiny_setup, tmp_path):  # noqa: F811
    loss_module, batch, settings = _loss_and_batch(
        tiny_setup, tmp_path, kl_weight=1.0, draft_overrides={"draft_vocab_size": 48})
    labels = batch_labels(batch, settings.loss_on, settings.num_heads)
    selected = (labels != IGNORE).any(0)
    states = loss_module.head_states(batch["tokens"], batch["hidden"], selected, batch["greedy"])
    logits = loss_module.project(states).float()  # [K, P, 48]
    h_next = next_hidden_states(batch["hidden"], selected, settings.num_heads)
    rows = loss_module.draft._target_lm_head[loss_module.draft.draft_to_target_ids]  # [48, d]
    p = (h_next @ rows.t()).softmax(-1)
    by_hand = (p * (p.log() - logits.log_softmax(-1))).sum(-1)  # [K, P]
    valid = labels[:, selected] != IGNORE
    _, stats = loss_module._loss_and_stats(logits, labels[:, selected], states, h_next)
    torch.testing.assert_close(stats[:, 3], torch.where(valid, by_hand, 0.0).sum(-1),
                               atol=1e-3, rtol=1e-4)


def test_training_with_both_terms_learns_and_resumes_exactly(tiny_setup, tmp_path):  # noqa: F811
    common = dict(epochs=2, save_every=3, kl_weight=0.5, regression_weight=1.0,
                  loss_positions_fraction=0.5, eval_every=8)
    whole = train(settings_for(tiny_setup, tmp_path / "whole", **common))
    part = train(settings_for(tiny_setup, tmp_path / "part", stop_at_step=5, **common))
    assert not part["finished"] and part["steps"] == 5
    resumed = train(settings_for(tiny_setup, tmp_path / "part", **common))
    assert resumed["finished"] and resumed["steps"] == whole["steps"] == 16
    a, b = load_draft(tmp_path / "whole" / "draft"), load_draft(tmp_path / "part" / "draft")
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name
    assert resumed["validation"] == whole["validation"]
    assert whole["settings"]["kl_weight"] == 0.5 and whole["settings"]["regression_weight"] == 1.0
    log = [json.loads(line) for line in (tmp_path / "whole" / "log.jsonl").read_text().splitlines()]
    steps = [r for r in log if "loss" in r]
    assert "head_kl" in steps[0] and "head_regression" in steps[0]
    assert steps[-1]["head_regression"][0] < steps[0]["head_regression"][0]  # it regresses
    # It learns: far better after 16 steps than after 5.
    assert whole["validation"]["head_accuracy"][0] > part["validation"]["head_accuracy"][0] + 0.1
    with pytest.raises(ValueError, match="settings changed.*kl_weight"):
        train(settings_for(tiny_setup, tmp_path / "part", **{**common, "kl_weight": 0.1}))


@pytest.mark.parametrize("overrides, message", [
    (dict(kl_weight=-1.0), "kl_weight must be >= 0"),
    (dict(regression_weight=-0.5), "regression_weight must be >= 0"),
    (dict(kl_weight=1.0, draft_kind="eagle"), "EAGLE's own"),
])
def test_bad_distillation_settings_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        TrainingSettings(target="t", train_data="d", output_dir="o", **overrides)


def test_the_cli_flags_reach_the_settings(tiny_setup, tmp_path):  # noqa: F811
    parser = train_parser()
    argv = ["--target", tiny_setup["target"], "--train-data", tiny_setup["train"],
            "--val-data", "none", "--output-dir", str(tmp_path)]
    default = settings_from_args(parser.parse_args(argv), parser)
    assert (default.kl_weight, default.regression_weight) == (0.0, 0.0)
    settings = settings_from_args(parser.parse_args(
        argv + ["--kl-weight", "0.5", "--regression-weight", "2"]), parser)
    assert (settings.kl_weight, settings.regression_weight) == (0.5, 2.0)
