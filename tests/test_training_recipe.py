"""Training-recipe options on tiny random targets: the loss on a random subset of positions
(--loss-positions-fraction) and the CPU-second clock of the logs; the checks and the CLI
flag of --skip-lookup-matches too (its behaviour: test_training_lookup_positions.py)."""
from __future__ import annotations

import json

import pytest
import torch

from test_training import settings_for, tiny_setup  # noqa: F401 (a fixture)
from vllm_chimera.checkpoint import load_draft
from vllm_chimera.training import TrainingSettings, train
from vllm_chimera.commands.train import settings_from_args, train_parser
from vllm_chimera.training.loss import (IGNORE, DraftLoss, batch_labels, position_seeds,
                                        subsample_positions)
from vllm_chimera.training.trainer import build_draft, build_loss, evaluate, load_target_and_data

CPU = torch.device("cpu")


def test_subsample_positions_keeps_a_seeded_share_of_each_rows_selection():
    g = torch.Generator().manual_seed(0)
    selected = torch.rand(5, 200, generator=g) < 0.7  # [5, 200]
    selected[3] = False  # a row with nothing labelled keeps nothing
    selected[4] = False
    selected[4, 17] = True  # one labelled position: kept (at least one per row)
    seeds = position_seeds(0, 7, [10, 11, 12, 13, 14])
    subset = subsample_positions(selected, 0.25, seeds)
    assert not (subset & ~selected).any()  # only labelled positions
    counts = selected.sum(-1)
    assert subset.sum(-1).tolist() == [round(0.25 * int(n)) for n in counts[:3]] + [0, 1]
    assert torch.equal(subset, subsample_positions(selected, 0.25, seeds))  # reproducible
    # Each row depends on its own seed only (not on the batch it is in) ...
    assert torch.equal(subsample_positions(selected[1:2], 0.25, seeds[1:2]), subset[1:2])
    # ... and the draw changes with the step and the sequence.
    assert not torch.equal(subsample_positions(selected, 0.25, position_seeds(0, 8, [10, 11, 12, 13, 14])),
                           subset)
    assert not torch.equal(subsample_positions(selected[:1], 0.25, position_seeds(0, 7, [11])),
                           subset[:1])
    assert torch.equal(subsample_positions(selected, 1.0, seeds), selected)


def test_the_subsets_are_spread_over_the_sequence():
    """Over many steps every labelled position is drawn about equally often."""
    selected = torch.ones(1, 40, dtype=torch.bool)
    selected[0, :8] = False
    hits = sum(subsample_positions(selected, 0.25, position_seeds(0, step, [0])).int()
               for step in range(400))[0]  # [40]
    assert hits[:8].sum() == 0 and hits.sum() == 400 * 8
    assert hits[8:].min() > 0.5 * 100 and hits[8:].max() < 1.5 * 100  # 100 expected each


@pytest.fixture(scope="module")
def loss_pair(tiny_setup, tmp_path_factory):  # noqa: F811
    """(the same Chimera draft's loss with the subset option and without it, a batch)."""
    settings = settings_for(tiny_setup, tmp_path_factory.mktemp("pair"), loss_positions_fraction=0.25)
    target, _, train_data, val_data = load_target_and_data(settings, CPU)
    draft = build_draft(settings, target, train_data)
    with torch.no_grad():  # trained heads (their output layers start at zero): distinct logits
        for p in draft.parameters():
            if p.requires_grad:
                p.add_(0.02 * torch.randn_like(p))
    subset = build_loss(settings, draft)
    full = DraftLoss(draft, settings.weights(), settings.loss_on)
    batch = train_data.batch([0, 1, 2, 3], CPU)
    batch["position_seeds"] = position_seeds(settings.seed, 5, [0, 1, 2, 3])
    return subset, full, batch, settings, val_data


def _count_positions(loss_module, batch, monkeypatch):
    """(positions fed to the heads, the per-head stats) of one forward."""
    seen = []
    original = type(loss_module).head_states

    def counting(self, tokens, hidden, selected, greedy):
        seen.append(selected.clone())
        return original(self, tokens, hidden, selected, greedy)

    monkeypatch.setattr(type(loss_module), "head_states", counting)
    _, stats = loss_module(batch)
    return seen[-1], stats


def test_the_subset_feeds_a_quarter_of_the_labelled_positions_to_the_heads(loss_pair, monkeypatch):
    subset, full, batch, settings, _ = loss_pair
    assert subset.positions_fraction == 0.25 and full.positions_fraction is None
    subset.train(), full.train()
    labels = batch_labels(batch, settings.loss_on, settings.num_heads)  # [K, B, L-1]
    labelled = (labels != IGNORE).any(0)  # [B, L-1]
    chosen, stats = _count_positions(subset, batch, monkeypatch)
    everything, full_stats = _count_positions(full, batch, monkeypatch)
    assert torch.equal(everything, labelled)
    assert not (chosen & ~labelled).any()  # labels and masks respected: no unlabelled position
    assert chosen.sum(-1).tolist() == [round(0.25 * int(n)) for n in labelled.sum(-1)]
    # The statistics count exactly the labels at the chosen positions.
    assert stats[:, 2].tolist() == (labels[:, chosen] != IGNORE).sum(-1).float().tolist()
    assert full_stats[:, 2].tolist() == (labels != IGNORE).sum((1, 2)).float().tolist()
    # The loss is the per-head mean over the chosen positions' labels.
    _, by_hand = full._loss_and_stats(
        full.head_logits(batch["tokens"], batch["hidden"], chosen, batch["greedy"]).float(), labels[:, chosen])
    torch.testing.assert_close(stats, by_hand)


def test_validation_scores_every_position_with_the_option_on(loss_pair, monkeypatch):
    subset, full, batch, settings, val_data = loss_pair
    subset.eval()
    chosen, _ = _count_positions(subset, batch, monkeypatch)
    labels = batch_labels(batch, settings.loss_on, settings.num_heads)
    assert torch.equal(chosen, (labels != IGNORE).any(0))
    monkeypatch.undo()
    # evaluate() is called mid-training, from training mode: it must still score everything.
    subset.train(), full.train()
    assert evaluate(subset, val_data, settings, CPU) == evaluate(full, val_data, settings, CPU)
    assert subset.training  # and it gives training mode back


def test_a_training_step_feeds_fewer_positions_to_the_heads(tiny_setup, tmp_path, monkeypatch):  # noqa: F811
    """Counted inside real runs: a quarter of the positions per training step, all of them
    in the validations; the option is saved with the settings."""
    counts = {"train": 0, "eval": 0}
    original = DraftLoss.head_states

    def counting(self, tokens, hidden, selected, greedy):
        counts["train" if self.training else "eval"] += int(selected.sum())
        return original(self, tokens, hidden, selected, greedy)

    monkeypatch.setattr(DraftLoss, "head_states", counting)
    runs = {}
    for name, fraction in (("full", None), ("quarter", 0.25)):
        counts.update(train=0, eval=0)
        metrics = train(settings_for(tiny_setup, tmp_path / name, epochs=1,
                                     loss_positions_fraction=fraction))
        runs[name] = (dict(counts), metrics)
    (full_counts, full), (quarter_counts, quarter) = runs["full"], runs["quarter"]
    assert quarter["settings"]["loss_positions_fraction"] == 0.25
    assert full["settings"]["loss_positions_fraction"] is None
    # Every sequence here has 38 positions where some head has a label (36 per head): one
    # epoch of 64 sequences feeds the heads 64 x 38 of them, or 64 x round(9.5) = 64 x 10.
    assert full_counts["train"] == 64 * 38 and quarter_counts["train"] == 64 * 10
    assert quarter_counts["eval"] == full_counts["eval"] > 0
    assert quarter["validation"] != full["validation"]  # it trained something else


def test_resume_with_the_subset_equals_uninterrupted(tiny_setup, tmp_path):  # noqa: F811
    common = dict(epochs=2, save_every=3, loss_positions_fraction=0.25, eval_every=4)
    whole = train(settings_for(tiny_setup, tmp_path / "whole", **common))
    part = train(settings_for(tiny_setup, tmp_path / "part", stop_at_step=5, **common))
    assert not part["finished"] and part["steps"] == 5
    resumed = train(settings_for(tiny_setup, tmp_path / "part", **common))
    assert resumed["finished"] and resumed["steps"] == whole["steps"] == 16
    a, b = load_draft(tmp_path / "whole" / "draft"), load_draft(tmp_path / "part" / "draft")
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name
    assert resumed["validation"] == whole["validation"]
    # The CPU clock carries over the interruption: it only grows, and the totals agree.
    log = [json.loads(line) for line in (tmp_path / "part" / "log.jsonl").read_text().splitlines()]
    clock = [r["cpu_seconds"] for r in log]
    assert all(r.get("cpu_seconds") is not None for r in log) and clock == sorted(clock)
    assert resumed["train_cpu_seconds"] == pytest.approx(clock[-1], abs=0.1) and clock[-1] > 0


def test_validations_are_logged_with_the_cpu_clock(tiny_setup, tmp_path):  # noqa: F811
    metrics = train(settings_for(tiny_setup, tmp_path / "run", epochs=2, eval_every=4))
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    validations = [r for r in log if "validation" in r]
    assert [r["step"] for r in validations] == [4, 8, 12, 16]
    clock = [r["cpu_seconds"] for r in validations]
    assert clock == sorted(clock) and clock[0] > 0
    assert clock[-1] == pytest.approx(metrics["train_cpu_seconds"], abs=0.06)  # (rounded to 0.1)
    steps = {r["step"]: r for r in log if "loss" in r}
    assert all(steps[r["step"]]["cpu_seconds"] == r["cpu_seconds"] for r in validations)


def test_resume_refuses_a_changed_fraction(tiny_setup, tmp_path):  # noqa: F811
    train(settings_for(tiny_setup, tmp_path / "run", epochs=1, stop_at_step=2))
    with pytest.raises(ValueError, match="settings changed.*loss_positions_fraction"):
        train(settings_for(tiny_setup, tmp_path / "run", epochs=1, loss_positions_fraction=0.5))


@pytest.mark.parametrize("overrides, message", [
    (dict(loss_positions_fraction=0.0), "must be in"),
    (dict(loss_positions_fraction=1.5), "must be in"),
    (dict(loss_positions_fraction=0.5, draft_kind="eagle"), "not eagle"),
    (dict(skip_lookup_matches=0), "must be >= 1"),
    (dict(skip_lookup_matches=2, draft_kind="eagle"), "skip_lookup_matches .*not eagle"),
])
def test_bad_recipe_options_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        TrainingSettings(target="t", train_data="d", output_dir="o", **overrides)


def test_the_cli_flag_reaches_the_settings(tiny_setup, tmp_path):  # noqa: F811
    parser = train_parser()
    argv = ["--target", tiny_setup["target"], "--train-data", tiny_setup["train"],
            "--val-data", "none", "--output-dir", str(tmp_path), "--head-weights", "1,0.6,0.2,0.1"]
    default = settings_from_args(parser.parse_args(argv), parser)
    assert default.loss_positions_fraction is None and default.skip_lookup_matches is None
    settings = settings_from_args(parser.parse_args(argv + ["--loss-positions-fraction", "0.25",
                                                            "--skip-lookup-matches", "3"]), parser)
    assert settings.loss_positions_fraction == 0.25 and settings.weights() == [1, 0.6, 0.2, 0.1]
    assert settings.skip_lookup_matches == 3


def test_the_pilot_table_compares_runs_at_the_budget_all_reached(tmp_path):
    from vllm_chimera.training.plot import plot_validation_curves, validation_table

    def run(points):  # (cpu_seconds, head-0 accuracy) validations
        return [{"step": 10 * (k + 1), "cpu_seconds": x,
                 "validation": {"head_accuracy": [a, a / 2], "est_accept_length": 1 + a}}
                for k, (x, a) in enumerate(points)]

    runs = {"slow": run([(50, 0.1), (100, 0.2)]), "fast": run([(40, 0.1), (80, 0.3), (120, 0.4)])}
    table = validation_table(runs).splitlines()
    assert "@100: head 0" in table[0]
    assert table[2].startswith("| slow | 20 | 100 | 0.200 | 0.100 | 1.200 | 0.200 | 0.100 |")
    assert table[3].startswith("| fast | 30 | 120 | 0.400 | 0.200 | 1.400 | 0.350 | 0.175 |")
    assert plot_validation_curves(runs, tmp_path / "c.png").stat().st_size > 0
