import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from vllm_chimera.checkpoint import (ChimeraCheckpointError, load_draft, load_draft_for_target,
                                     save_draft)

from conftest import build_random_draft, build_tiny_target


@pytest.fixture
def saved_draft(tiny_target, tmp_path):
    draft = build_random_draft(tiny_target, num_heads=3)
    save_draft(draft, tmp_path / "draft")
    return draft, tmp_path / "draft"


def test_round_trip_gives_the_same_model(tiny_target, saved_draft):
    draft, folder = saved_draft
    assert json.loads((folder / "config.json").read_text())["model_type"] == "chimera"
    loaded = load_draft_for_target(folder, tiny_target)
    # The target's embedding and LM head are not stored in the draft checkpoint.
    assert not any("embed" in k or k.startswith("lm_head") for k in load_file(folder / "model.safetensors"))
    hidden = torch.randn(4, 64)
    s = torch.randn(4, 64)
    torch.testing.assert_close(loaded.head_logits(hidden, s), draft.head_logits(hidden, s),
                               rtol=0, atol=0)
    for (name, a), (_, b) in zip(draft.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("change, message", [
    (dict(hidden_size=32), "hidden size: draft trained for 64, target has 32"),
    (dict(vocab_size=256), "vocabulary size: draft trained for 128, target has 256"),
])
def test_draft_for_another_target_is_refused(saved_draft, tmp_path, change, message):
    _, folder = saved_draft
    other = build_tiny_target(tmp_path / "other", **change)
    with pytest.raises(ChimeraCheckpointError, match=message):
        load_draft_for_target(folder, other)


def test_other_architecture_is_refused(saved_draft, tiny_target):
    _, folder = saved_draft
    config = tiny_target.config.__class__(**tiny_target.config.to_dict())
    config.architectures = ["MistralForCausalLM"]
    with pytest.raises(ChimeraCheckpointError, match="architecture"):
        load_draft(folder, config)


def test_missing_folder_and_wrong_folder(tmp_path, tiny_target):
    with pytest.raises(ChimeraCheckpointError, match="not found"):
        load_draft(tmp_path / "nowhere")
    tiny_target.save_pretrained(tmp_path / "target")
    with pytest.raises(ChimeraCheckpointError, match="model_type='llama'"):
        load_draft(tmp_path / "target")


def test_corrupt_weights(saved_draft):
    _, folder = saved_draft
    (folder / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ChimeraCheckpointError, match="corrupt"):
        load_draft(folder)


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.update(extra_weight=torch.ones(3)), "unknown weights \\['extra_weight'\\]"),
    (lambda s: s.pop("fuse.weight"), "missing weights \\['fuse.weight'\\]"),
    (lambda s: s.update({"fuse.weight": torch.ones(3, 3)}), "fuse.weight has shape"),
    (lambda s: s.update({"fuse.weight": torch.full((64, 128), float("nan"))}), "NaN"),
])
def test_weights_that_do_not_match_the_config(saved_draft, edit, message):
    _, folder = saved_draft
    state = load_file(folder / "model.safetensors")
    edit(state)
    save_file(state, folder / "model.safetensors")
    with pytest.raises(ChimeraCheckpointError, match=message):
        load_draft(folder)


def test_export_casts_to_fp16_and_stores_the_schedules_given(saved_draft, tmp_path):
    from vllm_chimera.measurements import load_measurements, save_measurements
    from vllm_chimera.training.checkpointing import export_draft

    draft, folder = saved_draft
    save_measurements(folder, "cpu", step_aside_schedule=[[1, 2, 3]])  # not carried over
    schedules = {"cpu": [[1, 4, 1], [5, 16, 0]]}
    export_draft(folder, tmp_path / "shipped", step_aside_schedules=schedules)
    measured = load_measurements(tmp_path / "shipped")
    assert {d: m.step_aside_schedule for d, m in measured.items()} == schedules
    weights = load_file(tmp_path / "shipped" / "model.safetensors")
    assert {w.dtype for w in weights.values()} == {torch.float16}
    export_draft(folder, tmp_path / "plain")  # none given: none stored
    assert load_measurements(tmp_path / "plain") == {}
    with pytest.raises(ValueError, match=r"step_aside_schedules\['cpu'\]"):
        export_draft(folder, tmp_path / "bad", step_aside_schedules={"cpu": [[4, 1, 1]]})
    assert not (tmp_path / "bad").exists()  # refused before anything is written


@pytest.fixture
def two_drafts(tiny_target, tmp_path):
    """Two saved drafts of one design with different weights (seeds 1 and 2)."""
    folders = []
    for seed in (1, 2):
        save_draft(build_random_draft(tiny_target, num_heads=3, seed=seed), tmp_path / f"d{seed}")
        folders.append(tmp_path / f"d{seed}")
    return folders


def test_average_of_drafts_is_the_weighted_mean_of_their_weights(two_drafts):
    from vllm_chimera.training.checkpointing import average_drafts

    a, b = (load_draft(f).state_dict() for f in two_drafts)
    for weights, (wa, wb) in ((None, (0.5, 0.5)), ([3.0, 1.0], (0.75, 0.25))):
        soup = average_drafts(two_drafts, weights).state_dict()
        for name, tensor in soup.items():
            torch.testing.assert_close(tensor, wa * a[name] + wb * b[name], msg=name)
        assert not torch.equal(soup["fuse.weight"], a["fuse.weight"])
    same = average_drafts([two_drafts[0], two_drafts[0]]).state_dict()  # a draft with itself
    assert all(torch.equal(same[name], a[name]) for name in a)


def test_average_refuses_drafts_that_are_not_one_design(two_drafts, tiny_target, tmp_path):
    from vllm_chimera.training.checkpointing import average_drafts

    save_draft(build_random_draft(tiny_target, num_heads=2), tmp_path / "two_heads")
    with pytest.raises(ValueError, match="num_decoding_heads 2 \\(first: 3\\)"):
        average_drafts([two_drafts[0], tmp_path / "two_heads"])
    for seed, folder in ((1, "v1"), (2, "v2")):  # one reduced vocabulary, in two orders
        draft = build_random_draft(tiny_target, num_heads=3, seed=seed, draft_vocab_size=16)
        if seed == 2:
            draft.draft_to_target_ids.copy_(draft.draft_to_target_ids.flip(0))
        save_draft(draft, tmp_path / folder)
    with pytest.raises(ValueError, match="another reduced vocabulary"):
        average_drafts([tmp_path / "v1", tmp_path / "v2"])
    with pytest.raises(ValueError, match="at least two drafts"):
        average_drafts(two_drafts[:1])
    with pytest.raises(ValueError, match="one positive weight per draft"):
        average_drafts(two_drafts, [1.0, 0.0])
    other = build_tiny_target(tmp_path / "other", hidden_size=32)
    with pytest.raises(ChimeraCheckpointError, match="another target"):
        average_drafts(two_drafts, target_config=other.config)


def test_average_from_the_command_line(two_drafts, tmp_path, capsys):
    from vllm_chimera.commands.train import train_main

    target = tmp_path / "target"
    build_tiny_target(target)
    argv = ["--target", str(target), "--output-dir", str(tmp_path / "soup"),
            "--average", ",".join(map(str, two_drafts))]
    assert train_main(argv + ["--average-weights", "1,3"]) == 0
    soup, b = load_draft(tmp_path / "soup" / "draft"), load_draft(two_drafts[1])
    a = load_draft(two_drafts[0])
    torch.testing.assert_close(soup.fuse.weight, 0.25 * a.fuse.weight + 0.75 * b.fuse.weight)
    record = json.loads((tmp_path / "soup" / "average.json").read_text())
    assert record == {"drafts": list(map(str, two_drafts)), "weights": [1.0, 3.0]}
    for bad, message in ((argv[:4] + ["--average-weights", "1,1"], "needs --average"),
                         (argv + ["--average-weights", "1"], "one positive weight per draft"),
                         (argv + ["--average-weights", "x,1"], "could not convert"),
                         (argv + ["--evaluate", str(two_drafts[0])], "a run of its own")):
        with pytest.raises(SystemExit):
            train_main(bad)
        assert message in capsys.readouterr().err
