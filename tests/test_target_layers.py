"""A draft that reads the target's intermediate layers (config.target_layer_ids, EAGLE-3's
lesson): the capture, the cache, the zero start, the settings, and the reference decoder
reading exactly what training read."""
from __future__ import annotations

import json

import pytest
import torch

from vllm_chimera.checkpoint import load_draft
from vllm_chimera.config import ChimeraConfig
from vllm_chimera.reference import ChimeraDrafter, SpeculativeDecoder, generate_plain
from vllm_chimera.target_layers import capture_layer_inputs, default_target_layer_ids
from vllm_chimera.training.data import CachedData, build_cache, cache_key, target_outputs
from vllm_chimera.training.loss import DraftLoss
from vllm_chimera.training.trainer import evaluate_draft, train
from vllm_chimera.tree import TokenTree

from conftest import build_random_draft, build_tiny_target
from test_training import settings_for, tiny_setup  # noqa: F401 (fixture)


def test_layer_i_is_the_input_of_decoder_layer_i(tmp_path):
    """vLLM's aux hidden state i: the residual stream after i layers (0: the embeddings),
    which Hugging Face's output_hidden_states lists at index i."""
    target = build_tiny_target(tmp_path / "t", num_layers=3)
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), capture_layer_inputs(target, [0, 2]) as captured:
        out = target.base_model(input_ids=ids, output_hidden_states=True)
    assert len(captured) == 1 and captured[0].shape == (2, 7, 2 * 64)
    torch.testing.assert_close(captured[0][..., :64], out.hidden_states[0], rtol=0, atol=0)
    torch.testing.assert_close(captured[0][..., 64:], out.hidden_states[2], rtol=0, atol=0)
    assert not any(layer._forward_pre_hooks for layer in target.base_model.layers)  # removed
    with pytest.raises(ValueError, match="below the target's 3 layers"):
        with capture_layer_inputs(target, [1, 3]):
            pass
    assert default_target_layer_ids(30) == (2, 15, 27)  # vLLM's EAGLE-3 default


@pytest.mark.parametrize("layer_ids", [[1, 0], [5], [0, 0], [-1], [True]])
def test_bad_layer_ids_are_refused(tiny_target, layer_ids):
    """(An empty list means no layers: the config stores None.)"""
    with pytest.raises(ValueError, match="target_layer_ids"):
        ChimeraConfig.for_target(tiny_target.config, target_layer_ids=layer_ids)
    assert ChimeraConfig.for_target(tiny_target.config, target_layer_ids=[]).target_layer_ids is None


def test_the_cache_stores_the_layers(tmp_path):
    target = build_tiny_target(tmp_path / "t", num_layers=3, seed=3)
    seqs = [(list(range(5 + i)), [1] * (5 + i)) for i in range(4)]
    data = build_cache(target, seqs, tmp_path / "c", batch_tokens=16, progress=False,
                       layer_ids=[1, 2])
    assert json.loads((tmp_path / "c" / "meta.json").read_text())["target_layer_ids"] == [1, 2]
    batch = CachedData.open(tmp_path / "c").batch([3, 0], torch.device("cpu"))
    assert batch["layers"].shape == (2, 8, 2 * 64)
    _, _, layers = target_outputs(target, torch.arange(8)[None], torch.ones(1, 8, dtype=torch.long),
                                  layer_ids=[1, 2])
    torch.testing.assert_close(batch["layers"][0], layers[0], atol=2e-2, rtol=1e-2)  # fp16
    assert not batch["layers"][1, 5:].any()  # padding
    assert "layers" not in build_cache(target, seqs, tmp_path / "plain", progress=False).batch(
        [0], torch.device("cpu"))
    data_file = tmp_path / "d.jsonl"
    data_file.write_text("{}\n")
    target.save_pretrained(tmp_path / "saved")
    plain = cache_key(tmp_path / "saved", data_file, 64, None)
    assert plain == cache_key(tmp_path / "saved", data_file, 64, None, "fp32", None)  # old keys hold
    assert plain != cache_key(tmp_path / "saved", data_file, 64, None, "fp32", [1, 2])
    assert len(data) == 4 and data.layers.shape == (sum(5 + i for i in range(4)), 2 * 64)


def test_a_zero_fuse_is_the_draft_without_layers(tiny_target):
    """target_layer_fuse starts at zero: the same predictions as the design without layers."""
    plain = build_random_draft(tiny_target, num_heads=3)
    layered = build_random_draft(tiny_target, num_heads=3, target_layer_ids=[0, 1])
    missing = layered.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert sorted(missing) == ["target_layer_fuse.weight", "target_layer_norms.0.weight",
                               "target_layer_norms.1.weight"]
    assert not layered.target_layer_fuse.weight.any()
    h, layers = torch.randn(5, 64), 30 * torch.randn(5, 128)
    torch.testing.assert_close(layered.fuse_target_layers(h, layers), h)
    torch.nn.init.normal_(layered.target_layer_fuse.weight, std=0.1)
    assert not torch.allclose(layered.fuse_target_layers(h, layers), h)
    with pytest.raises(ValueError, match="pass their states"):
        layered.fuse_target_layers(h, None)
    with pytest.raises(ValueError, match="without target_layer_ids"):
        plain.fuse_target_layers(h, layers)


def _trained_layer_draft(target, layer_ids):
    draft = build_random_draft(target, num_heads=3, target_layer_ids=layer_ids)
    torch.nn.init.normal_(draft.target_layer_fuse.weight, std=0.2)  # as if trained: it matters
    return draft


def test_the_reference_decoder_reads_what_training_read(tiny_target, prompts):
    """Each proposal of the decoder (KV-cached target forwards, layers captured as they come)
    equals the draft run over the whole sequence as the training loss runs it (the target's
    outputs as the cache stores them); and greedy output equals plain."""
    draft = _trained_layer_draft(tiny_target, [0, 1])

    class Recording(ChimeraDrafter):
        def propose(self, token_ids, new_hidden_states, top_k, new_layer_states=None):
            proposal = super().propose(token_ids, new_hidden_states, top_k, new_layer_states)
            seen.append((token_ids.clone(), proposal))
            return proposal

    seen = []
    for prompt in prompts:
        decoder = SpeculativeDecoder(tiny_target, Recording(draft), TokenTree.chain(3))
        assert decoder.generate(prompt, 20).token_ids == generate_plain(tiny_target, prompt, 20).token_ids
    loss = DraftLoss(draft, head_weights=[1.0] * 3)
    checked = 0
    for token_ids, proposal in seen[::3]:
        ids = token_ids[:-1][None]  # x_0 .. x_n: the positions with hidden states
        hidden, _, layers = target_outputs(tiny_target, ids, torch.ones_like(ids), layer_ids=[0, 1])
        tokens = token_ids[None]  # the trigram and sequential inputs reach x_{n+1}
        batch = {"tokens": tokens, "hidden": torch.cat([hidden, hidden[:, -1:]], 1),
                 "layers": torch.cat([layers, layers[:, -1:]], 1)}
        with torch.no_grad():
            h = loss.draft_inputs(batch)[:, :-1]  # [1, n + 1, d]
            n = h.shape[1]
            s = draft.encode(tokens[:, 1:], h, torch.arange(n)[None],
                             torch.tensor([[-1, int(tokens[0, 0])]]))
            expected = draft.propose(h[0, -1], s[0, -1], 1)  # [K, 1]
        assert torch.equal(proposal[:, :1], expected)
        checked += 1
    assert checked >= 5
    # Without the layers the same draft proposes otherwise: the check above has teeth.
    blind = ChimeraDrafter(draft)
    blind.target_layer_ids = None
    with pytest.raises(ValueError, match="pass their states"):
        SpeculativeDecoder(tiny_target, blind, TokenTree.chain(3)).generate(prompts[1], 5)


def test_init_from_a_draft_without_layers_starts_from_its_function(tiny_setup, tmp_path):
    """--target-layer-ids with --init-from a draft that read none: lr 0 reproduces its
    validation exactly; learning moves the new fuse. (Breaking the zero start fails here.)"""
    train(settings_for(tiny_setup, tmp_path / "first", epochs=1))
    init = str(tmp_path / "first" / "draft")
    first = json.loads((tmp_path / "first" / "metrics.json").read_text())
    layers = {"target_layer_ids": [0]}
    same = train(settings_for(tiny_setup, tmp_path / "same", epochs=1, lr=0.0, init_from=init,
                              draft_overrides=layers))
    assert same["validation"]["head_accuracy"] == first["validation"]["head_accuracy"]
    assert same["validation"]["loss"] == pytest.approx(first["validation"]["loss"], rel=1e-6)
    moved = train(settings_for(tiny_setup, tmp_path / "moved", epochs=1, init_from=init,
                               draft_overrides=layers))
    grown = load_draft(tmp_path / "moved" / "draft")
    assert grown.config.target_layer_ids == [0] and grown.config.target_num_hidden_layers == 1
    assert grown.target_layer_fuse.weight.abs().sum() > 0
    assert moved["validation"]["loss"] < first["validation"]["loss"]
    # chimera-train --evaluate reads the layers a saved draft needs, unasked.
    evaluated = evaluate_draft(settings_for(tiny_setup, tmp_path / "eval"), str(tmp_path / "moved" / "draft"))
    assert evaluated["validation"]["head_accuracy"] == moved["validation"]["head_accuracy"]
    # A draft saved before target_num_hidden_layers was recorded (the shipped one) still
    # continues, with or without layers.
    config_path = tmp_path / "first" / "draft" / "config.json"
    config = json.loads(config_path.read_text())
    del config["target_num_hidden_layers"]
    config_path.write_text(json.dumps(config))
    for overrides in ({}, layers):
        old = train(settings_for(tiny_setup, tmp_path / f"old{len(overrides)}", epochs=1, lr=0.0,
                                 init_from=init, draft_overrides=overrides))
        assert old["validation"]["head_accuracy"] == first["validation"]["head_accuracy"]
    # The other way round (dropping the layers a draft reads) is refused.
    with pytest.raises(ValueError, match="not the draft these settings build: target_layer_ids"):
        train(settings_for(tiny_setup, tmp_path / "drop", epochs=1,
                           init_from=str(tmp_path / "moved" / "draft")))


def test_the_layer_flag_reaches_the_settings(tiny_setup, tmp_path):
    from vllm_chimera.commands.train import settings_from_args, train_parser

    parser = train_parser()
    argv = ["--target", tiny_setup["target"], "--output-dir", str(tmp_path),
            "--train-data", tiny_setup["train"], "--val-data", tiny_setup["val"]]
    settings = settings_from_args(parser.parse_args(argv + ["--target-layer-ids", "0"]), parser)
    assert settings.draft_overrides == {"target_layer_ids": [0]}
    for bad in ("1", "x", "0,0"):  # the bigram target has one layer
        with pytest.raises(SystemExit):
            settings_from_args(parser.parse_args(argv + ["--target-layer-ids", bad]), parser)
    with pytest.raises(SystemExit):  # a Chimera option: the peers refuse it
        settings_from_args(parser.parse_args(argv + ["--target-layer-ids", "0",
                                                     "--draft-kind", "medusa"]), parser)
