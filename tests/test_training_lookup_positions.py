"""Training where the heads draft: --skip-lookup-matches takes no loss at the positions where
vLLM's context lookup drafts, and validation scores the heads at the others separately.
(The rule itself is checked against vLLM's matcher in test_vllm_lookup.py.)"""
from __future__ import annotations

import pytest
import torch

from test_training import settings_for, tiny_setup  # noqa: F401 (a fixture)
from test_training_recipe import _count_positions
from vllm_chimera.checkpoint import load_draft
from vllm_chimera.context_lookup import lookup_matches
from vllm_chimera.training import TrainingSettings, train
from vllm_chimera.training.loss import IGNORE, DraftLoss, batch_labels, position_seeds
from vllm_chimera.training.trainer import build_draft, build_loss, evaluate, load_target_and_data

CPU = torch.device("cpu")


def test_lookup_matches_worked_example():
    tokens = torch.tensor([[5, 7, 5, 7, 9, 0], [1, 1, 1, 1, 0, 0]])
    lengths = torch.tensor([5, 4])
    assert lookup_matches(tokens, lengths, 2).tolist() == [[False, False, True, False, False],
                                                           [False, True, True, False, False]]
    assert lookup_matches(tokens, lengths, 1).tolist() == [[False, True, True, False, False],
                                                           [True, True, True, False, False]]
    assert not lookup_matches(tokens, lengths, 6).any()  # longer than any row: no match
    with pytest.raises(ValueError, match="min_match"):
        lookup_matches(tokens, lengths, 0)


@pytest.fixture(scope="module")
def skipping(tiny_setup, tmp_path_factory):  # noqa: F811
    """(the loss with --skip-lookup-matches 2, the same draft's loss without, a batch, settings,
    validation data)."""
    settings = settings_for(tiny_setup, tmp_path_factory.mktemp("skip"), skip_lookup_matches=2)
    target, _, train_data, val_data = load_target_and_data(settings, CPU)
    draft = build_draft(settings, target, train_data)
    with torch.no_grad():  # trained heads (their output layers start at zero): distinct logits
        for p in draft.parameters():
            if p.requires_grad:
                p.add_(0.02 * torch.randn_like(p))
    batch = train_data.batch([0, 1, 2, 3], CPU)
    batch["position_seeds"] = position_seeds(settings.seed, 5, [0, 1, 2, 3])
    return build_loss(settings, draft), DraftLoss(draft, settings.weights()), batch, settings, val_data


def test_training_takes_no_loss_where_the_lookup_drafts(skipping, monkeypatch):
    skip, _, batch, settings, _ = skipping
    assert skip.skip_lookup_matches == 2
    labelled = (batch_labels(batch, settings.loss_on, settings.num_heads) != IGNORE).any(0)
    matched = lookup_matches(batch["tokens"], batch["lengths"], 2)  # [B, L-1]
    # The tiny target's greedy answers repeat themselves: both kinds of position occur.
    assert (labelled & matched).any() and (labelled & ~matched).any()
    skip.train()
    chosen, stats = _count_positions(skip, batch, monkeypatch)
    assert torch.equal(chosen, labelled & ~matched)
    labels = batch_labels(batch, settings.loss_on, settings.num_heads)
    assert stats[:, 2].tolist() == (labels[:, chosen] != IGNORE).sum(-1).float().tolist()
    skip.eval()  # validation scores every position
    chosen, _ = _count_positions(skip, batch, monkeypatch)
    assert torch.equal(chosen, labelled)


def test_validation_reports_the_heads_where_the_lookup_misses(skipping):
    skip, full, _, settings, val_data = skipping
    metrics = evaluate(skip, val_data, settings, CPU)
    assert metrics == evaluate(full, val_data, settings, CPU)  # the same draft, every position
    misses = metrics["lookup_misses"]
    assert misses["min_match"] == 2 and 0 < misses["share"] < 1
    # By hand, head 0 over the validation positions the lookup has no match for.
    hits = count = 0
    full.eval()
    for start in range(0, len(val_data), settings.micro_batch_size):
        batch = val_data.batch(list(range(start, min(start + settings.micro_batch_size,
                                                     len(val_data)))), CPU)
        full(batch)
        miss = ~lookup_matches(batch["tokens"], batch["lengths"], 2)[full.last_selected]  # [P]
        hits += int(full.last_hits[0, miss].sum())
        count += int(full.last_valid[0, miss].sum())
    assert misses["head_accuracy"][0] == pytest.approx(hits / count)
    # With a min_match no sequence can match, the lookup never drafts: the figures are the
    # overall ones.
    never = TrainingSettings(**{**settings.__dict__, "skip_lookup_matches": 1000})
    overall = evaluate(full, val_data, never, CPU)
    assert overall["lookup_misses"]["share"] == 1.0
    assert overall["lookup_misses"]["head_accuracy"] == pytest.approx(overall["head_accuracy"])
    assert overall["lookup_misses"]["est_accept_length"] == pytest.approx(overall["est_accept_length"])


def test_a_run_skipping_the_lookups_positions_resumes_exactly(tiny_setup, tmp_path):  # noqa: F811
    common = dict(epochs=2, save_every=3, skip_lookup_matches=2, loss_positions_fraction=0.5,
                  eval_every=4)
    whole = train(settings_for(tiny_setup, tmp_path / "whole", **common))
    part = train(settings_for(tiny_setup, tmp_path / "part", stop_at_step=5, **common))
    assert not part["finished"] and part["steps"] == 5
    resumed = train(settings_for(tiny_setup, tmp_path / "part", **common))
    assert resumed["finished"] and resumed["settings"]["skip_lookup_matches"] == 2
    a, b = load_draft(tmp_path / "whole" / "draft"), load_draft(tmp_path / "part" / "draft")
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name
    assert resumed["validation"] == whole["validation"]
    # It trained something else than the same run over every position.
    plain = train(settings_for(tiny_setup, tmp_path / "plain", epochs=2, save_every=3,
                               loss_positions_fraction=0.5, eval_every=4))
    assert plain["validation"]["head_accuracy"] != whole["validation"]["head_accuracy"]
