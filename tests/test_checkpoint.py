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
    from vllm_chimera.training.checkpointing import export_draft

    draft, folder = saved_draft
    schedules = {"cpu": [[1, 4, 1], [5, 16, 0]]}
    export_draft(folder, tmp_path / "shipped", step_aside_schedules=schedules)
    config = json.loads((tmp_path / "shipped" / "config.json").read_text())
    assert config["step_aside_schedules"] == schedules
    weights = load_file(tmp_path / "shipped" / "model.safetensors")
    assert {w.dtype for w in weights.values()} == {torch.float16}
    export_draft(folder, tmp_path / "plain")  # none given: none stored
    assert json.loads((tmp_path / "plain" / "config.json").read_text()).get("step_aside_schedules") is None
    with pytest.raises(ValueError, match=r"step_aside_schedules\['cpu'\]"):
        export_draft(folder, tmp_path / "bad", step_aside_schedules={"cpu": [[4, 1, 1]]})
    assert not (tmp_path / "bad").exists()  # refused before anything is written
