import pytest
import torch
import torch.nn.functional as F

from vllm_chimera.config import ChimeraConfig
from vllm_chimera.model import ChimeraDraftModel, DraftKVCache

from conftest import build_random_draft


def _sequence(target, length, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, target.config.vocab_size, (length,), generator=g)
    with torch.no_grad():
        hidden = target.base_model(input_ids=ids[None]).last_hidden_state[0]
    return ids, hidden


def test_untrained_heads_start_from_the_targets_next_token_distribution(tiny_target):
    config = ChimeraConfig.for_target(tiny_target.config, num_decoding_heads=3)
    draft = ChimeraDraftModel(config).bind_target(tiny_target.get_input_embeddings().weight,
                                                  tiny_target.get_output_embeddings().weight)
    ids, hidden = _sequence(tiny_target, 6)
    s = torch.randn_like(hidden)
    logits = draft.head_logits(hidden, s)  # [K, 6, V]
    target_logits = tiny_target(input_ids=ids[None]).logits[0]
    for i in range(3):
        torch.testing.assert_close(logits[i], target_logits)


def test_trigram_features_follow_the_definition(tiny_target, tiny_draft):
    """u_{t+1} = W2 act(W1 [E x_{t-1}; E x_t; E x_{t+1}]), x before the start = x_0."""
    ids, hidden = _sequence(tiny_target, 5)
    E = tiny_target.get_input_embeddings().weight
    captured = {}
    hook = tiny_draft.fuse.register_forward_hook(lambda m, inp, out: captured.update(z_in=inp[0]))
    with torch.no_grad():
        tiny_draft.encode(ids[1:][None], hidden[:-1][None], torch.arange(4)[None],
                          torch.tensor([[-1, int(ids[0])]]))
    hook.remove()
    padded = torch.cat([ids[:1], ids[:1], ids])  # x_0 x_0 x_0 x_1 ...
    for t in range(4):  # u_{t+1} uses x_{t-1}, x_t, x_{t+1} = padded[t+1], padded[t+2], padded[t+3]
        window = torch.cat([E[padded[t + 1]], E[padded[t + 2]], E[padded[t + 3]]])
        u = tiny_draft.trigram_w2(F.silu(tiny_draft.trigram_w1(window)))
        torch.testing.assert_close(captured["z_in"][0, t], torch.cat([u, hidden[t]]))


@pytest.mark.parametrize("num_encoder_layers", [1, 2])
def test_incremental_encoding_equals_one_pass(tiny_target, num_encoder_layers):
    """Encoding positions in chunks through the KV cache gives the one-pass result:
    what the decoder relies on when it feeds only newly accepted positions. With a deeper
    encoder every layer keeps its own cache."""
    draft = build_random_draft(tiny_target, num_encoder_layers=num_encoder_layers)
    ids, hidden = _sequence(tiny_target, 12)
    n = 11  # positions 0..10 have a next token
    with torch.no_grad():
        full = draft.encode(ids[1:][None], hidden[:n][None], torch.arange(n)[None],
                            torch.tensor([[-1, int(ids[0])]]))
        cache, pieces = DraftKVCache(num_encoder_layers), []
        for t0, t1 in [(0, 4), (4, 5), (5, 11)]:
            prefix = torch.tensor([[int(ids[t0 - 1]) if t0 else -1, int(ids[t0])]])
            pieces.append(draft.encode(ids[t0 + 1: t1 + 1][None], hidden[t0:t1][None],
                                       torch.arange(t0, t1)[None], prefix, cache))
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)
    assert [layer.num_cached for layer in cache.layers] == [n] * num_encoder_layers


def test_deeper_encoder_stacks_its_layers(tiny_target):
    """The second layer reads the first's output and the final norm reads the second's:
    s = norm(layer_2(layer_1(z))). (Skipping extra_layers in encode fails here.)"""
    draft = build_random_draft(tiny_target, num_encoder_layers=2)
    ids, hidden = _sequence(tiny_target, 6)
    captured = {}
    hook = draft.fuse.register_forward_hook(lambda m, inp, out: captured.update(z=out))
    with torch.no_grad():
        s = draft.encode(ids[1:][None], hidden[:-1][None], torch.arange(5)[None],
                         torch.tensor([[-1, int(ids[0])]]))
        positions = torch.arange(5)[None]
        expected = draft.norm(draft.extra_layers[0](draft.layer(captured["z"], positions), positions))
        one_layer = draft.norm(draft.layer(captured["z"], positions))
    hook.remove()
    torch.testing.assert_close(s, expected)
    assert not torch.allclose(s, one_layer, atol=1e-3)
    with pytest.raises(ValueError, match="kv_cache has 1 layers"):
        draft.encode(ids[1:][None], hidden[:-1][None], positions,
                     torch.tensor([[-1, int(ids[0])]]), DraftKVCache(1))


def test_deeper_encoder_needs_the_context_encoder(tiny_target):
    with pytest.raises(ValueError, match="num_encoder_layers 2 needs the context encoder"):
        ChimeraConfig.for_target(tiny_target.config, num_encoder_layers=2,
                                 use_context_encoder=False)


def test_reduced_draft_vocabulary_maps_back_to_target_ids(tiny_target):
    frequent = torch.tensor([5, 9, 17, 3, 64, 100, 2, 77])
    draft = build_random_draft(tiny_target, num_heads=2, draft_vocab_size=8)
    draft.bind_target(tiny_target.get_input_embeddings().weight,
                      tiny_target.get_output_embeddings().weight, frequent_token_ids=frequent)
    ids, hidden = _sequence(tiny_target, 3)
    logits = draft.head_logits(hidden, torch.randn_like(hidden))
    assert logits.shape == (2, 3, 8)
    proposals = draft.propose(hidden[-1], torch.randn_like(hidden[-1]), top_k=3)  # [K, 3]
    assert proposals.shape == (2, 3) and set(proposals.flatten().tolist()) <= set(frequent.tolist())


@pytest.mark.parametrize("bad, message", [
    (dict(num_decoding_heads=0), "num_decoding_heads"),
    (dict(num_attention_heads=4, num_key_value_heads=3), "multiple"),
    (dict(trigram_activation="tanh"), "trigram_activation"),
    (dict(draft_vocab_size=10**9), "draft_vocab_size"),
])
def test_bad_config_values_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        ChimeraConfig(**{**dict(hidden_size=64, vocab_size=128, num_attention_heads=4,
                                 num_key_value_heads=2), **bad})


def test_unbound_draft_says_what_is_missing(tiny_target):
    draft = ChimeraDraftModel(ChimeraConfig.for_target(tiny_target.config))
    with pytest.raises(RuntimeError, match="bind_target"):
        draft.head_logits(torch.zeros(64), torch.zeros(64))


@pytest.mark.parametrize("ablation", ["use_trigram_encoder", "use_context_encoder"])
def test_ablations_build_run_and_round_trip(tiny_target, tmp_path, ablation):
    from vllm_chimera.checkpoint import load_draft_for_target, save_draft

    draft = build_random_draft(tiny_target, num_heads=2, **{ablation: False})
    names = {n.split(".")[0] for n, _ in draft.named_parameters()}
    assert ("trigram_w1" in names) is False
    assert ("layer" in names) is (ablation == "use_trigram_encoder")
    ids, hidden = _sequence(tiny_target, 6)
    with torch.no_grad():
        s = draft.encode(ids[1:][None], hidden[:-1][None], torch.arange(5)[None],
                         torch.tensor([[-1, int(ids[0])]]))
    assert s.shape == (1, 5, 64)
    assert bool(s.abs().sum() == 0) is (ablation == "use_context_encoder")
    save_draft(draft, tmp_path / "d")
    loaded = load_draft_for_target(tmp_path / "d", tiny_target)
    torch.testing.assert_close(loaded.head_logits(hidden, s[0].new_zeros(6, 64)),
                               draft.head_logits(hidden, s[0].new_zeros(6, 64)))
