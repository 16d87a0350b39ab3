"""Chimera's peers, Medusa-1 and EAGLE-1: trained by our trainer, exported, run by vLLM's own methods.

The target follows a permutation pi of its vocabulary (toy.build_permutation_pair; V = d =
128, head_dim 32 for vLLM's CPU attention), so the label of head / draft step i at t,
pi^(i+2)(x_t), is learnable from a little data and a trained peer's drafts are mostly
accepted: the accept path of vLLM's medusa and eagle methods is exercised, and vLLM's
accepted-token counts must equal the reference decoder's run with our own PyTorch peer.
Medusa also runs with a reduced draft vocabulary (REDUCED: vLLM's truncated_vocab_size and
token_map), which leaves the labels of 28 of the 128 tokens out of reach.
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import build_permutation_pair
from vllm_chimera.model import to_target_ids
from vllm_chimera.reference import SpeculativeDecoder
from vllm_chimera.training import TrainingSettings, train
from vllm_chimera.commands.train import train_main
from vllm_chimera.training.peers import (REDUCED_MEDUSA_ENGINE_KWARGS, EagleDraft, MedusaHeads,
                                         MedusaLoss, build_peer, eagle_llama_config, load_peer,
                                         peer_kind, vllm_engine_kwargs)
from vllm_chimera.training.trainer import frequent_token_ids, load_target_and_data
from vllm_chimera.tree import TokenTree

K = 3  # heads (Medusa), draft steps (EAGLE)
KINDS = ("medusa", "eagle")
V_DRAFT = 100  # the reduced Medusa's vocabulary (vLLM pads its LM head to 128 rows)
REDUCED = {"draft_vocab_size": V_DRAFT, "shared_lm_head": True}  # the form vLLM 0.32 runs
RUNS = {"medusa": ("medusa", {}), "eagle": ("eagle", {}), "medusa-reduced": ("medusa", REDUCED)}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The permutation target and token rows: a random 4-token prompt, then 36 tokens that
    follow pi (the target's own greedy continuation), loss on those 36."""
    root = tmp_path_factory.mktemp("peers")
    target, _, pi = build_permutation_pair(root, num_heads=K)
    g = torch.Generator().manual_seed(0)
    paths = {}
    for name, num_rows in (("train", 64), ("val", 16)):
        rows = []
        for prompt in torch.randint(0, 128, (num_rows, 4), generator=g).tolist():
            ids = prompt
            while len(ids) < 40:
                ids = ids + [int(pi[ids[-1]])]
            rows.append(json.dumps({"input_ids": ids, "loss_mask": [0] * 4 + [1] * 36}))
        paths[name] = root / f"{name}.jsonl"
        paths[name].write_text("\n".join(rows) + "\n")
    return {"root": root, "target_dir": str(root / "target"), "target": target, "pi": pi,
            "train": str(paths["train"]), "val": str(paths["val"])}


def settings_for(setup, output_dir, kind, **overrides) -> TrainingSettings:
    values = dict(target=setup["target_dir"], train_data=setup["train"], val_data=setup["val"],
                  output_dir=str(output_dir), cache_dir=str(setup["root"] / "cache"),
                  draft_kind=kind, num_heads=K, max_length=64, epochs=8, batch_size=8,
                  micro_batch_size=4, lr=1e-2, warmup_ratio=0.1, save_every=10, progress=False)
    values.update(overrides)
    return TrainingSettings(**values)


@pytest.fixture(scope="module")
def trained(setup):
    """Each run of RUNS trained once (64 steps, a second or two): name -> (metrics, output folder)."""
    runs = {}
    for name, (kind, overrides) in RUNS.items():
        out = setup["root"] / f"run-{name}"
        runs[name] = train(settings_for(setup, out, kind, eval_every=32,
                                        draft_overrides=overrides)), out
    return runs


# -- the models --------------------------------------------------------------------------------
def test_untrained_medusa_heads_predict_what_the_target_predicts(tiny_target):
    heads = build_peer("medusa", tiny_target, num_heads=3)
    h = torch.randn(5, tiny_target.config.hidden_size)  # [5, d]
    with torch.no_grad():
        expected = tiny_target.get_output_embeddings()(h)  # [5, V]
        torch.testing.assert_close(heads.head_logits(h), expected.expand(3, -1, -1))


@pytest.mark.parametrize("shared", [True, False])
def test_untrained_reduced_vocabulary_medusa_heads_predict_the_targets_rows(tiny_target, tmp_path,
                                                                            shared):
    """Each LM head (one shared, or one per head) starts as the target's rows of the reduced
    vocabulary; export writes vLLM's truncated-vocabulary format and loads back."""
    frequent = torch.randperm(128, generator=torch.Generator().manual_seed(3))[:V_DRAFT]
    overrides = {"draft_vocab_size": V_DRAFT, "shared_lm_head": shared}
    if shared:
        heads = build_peer("medusa", tiny_target, 3, overrides, frequent)
    else:
        with pytest.warns(UserWarning, match="vLLM 0.32 cannot load it"):
            heads = build_peer("medusa", tiny_target, 3, overrides, frequent)
    h = torch.randn(5, tiny_target.config.hidden_size)  # [5, d]
    with torch.no_grad():
        expected = tiny_target.get_output_embeddings()(h)[:, frequent]  # [5, V_DRAFT]
        torch.testing.assert_close(heads.head_logits(h), expected.expand(3, -1, -1))
        predicted = to_target_ids(heads.head_logits(h).argmax(-1), heads.token_map)  # [3, 5] target ids
    assert torch.equal(predicted[0], frequent[expected.argmax(-1)])
    heads.export(tmp_path, dtype=torch.float16)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["truncated_vocab_size"] == V_DRAFT and config["vocab_size"] == 128
    assert config["original_lm_head"] is shared
    weights = load_file(tmp_path / "model.safetensors")
    lm_heads = [f"lm_heads.{i}.weight" for i in range(1 if shared else 3)]
    assert sorted(k for k in weights if not k.startswith("blocks.")) == sorted(lm_heads + ["token_map"])
    assert all(weights[k].shape == (V_DRAFT, h.shape[-1]) for k in lm_heads)
    assert weights["token_map"].dtype == torch.int64 and torch.equal(weights["token_map"], frequent)
    assert vllm_engine_kwargs(tmp_path) == REDUCED_MEDUSA_ENGINE_KWARGS
    loaded = load_peer(tmp_path, tiny_target)
    assert loaded.draft_vocab_size == V_DRAFT and torch.equal(loaded.token_map, frequent)
    torch.testing.assert_close(loaded.head_logits(h), heads.head_logits(h), atol=1e-2, rtol=1e-2)


def test_medusa_labels_outside_the_reduced_vocabulary_teach_nothing(tiny_target):
    frequent = torch.tensor([7, 3, 100, 42])
    heads = build_peer("medusa", tiny_target, 2, {"draft_vocab_size": 4, "shared_lm_head": True},
                       frequent)
    loss = MedusaLoss(heads, [1.0, 0.8])
    labels = torch.tensor([[42, 5, -100], [7, 100, 127]])  # target ids, IGNORE = -100
    assert loss.train_labels(labels).tolist() == [[3, -100, -100], [0, 2, -100]]
    assert to_target_ids(torch.tensor([[3, 0], [1, 2]]), loss.draft_vocabulary()[0]).tolist() == [
        [42, 7], [3, 100]]


def test_eagle_layer_is_transformers_llama_layer_without_input_norm():
    """Our EAGLE layer = Hugging Face's LlamaDecoderLayer with the input norm removed (what
    vLLM builds), on the same weights: RoPE (SmolLM2's theta), GQA and parameter names agree."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    config = LlamaConfig(vocab_size=64, hidden_size=96, intermediate_size=160, num_attention_heads=3,
                         num_key_value_heads=1, rms_norm_eps=1e-5,
                         rope_parameters={"rope_type": "default", "rope_theta": 100000.0})
    eagle = EagleDraft(eagle_llama_config(config))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in eagle.parameters():
            p.normal_(std=0.2)
    config._attn_implementation = "sdpa"  # causal without a mask (eager would attend to all)
    reference = LlamaDecoderLayer(config, layer_idx=0).eval()
    state = {k.removeprefix("layers.0."): v for k, v in eagle.state_dict().items()
             if k.startswith("layers.0.")}
    reference.load_state_dict({**state, "input_layernorm.weight": torch.ones(config.hidden_size)})
    reference.input_layernorm = torch.nn.Identity()
    x = torch.randn(2, 7, config.hidden_size)  # [B, L, d]
    positions = torch.arange(300, 307).expand(2, 7)
    with torch.no_grad():
        ours, _ = eagle.layers[0](x, positions)
        theirs = reference(x, position_embeddings=LlamaRotaryEmbedding(config)(x, positions))
    torch.testing.assert_close(ours, theirs if torch.is_tensor(theirs) else theirs[0],
                               atol=1e-5, rtol=1e-5)


def test_eagle_rollout_from_every_position_equals_rollout_from_one(tiny_target):
    """Steps 2..K run at all positions at once see nothing a single rollout from n would not."""
    eagle = build_peer("eagle", tiny_target, num_heads=3)
    torch.manual_seed(1)
    tokens = torch.randint(0, 128, (1, 12))  # x_{t+1}
    hidden = torch.randn(1, 12, tiny_target.config.hidden_size)  # h_t
    positions = torch.arange(12)[None]
    with torch.no_grad():
        _, everywhere = eagle.rollout(tokens, hidden, positions, 3)  # [3, 12, V]
        for n in (0, 5, 11):
            _, single = eagle.rollout(tokens[:, :n + 1], hidden[:, :n + 1], positions[:, :n + 1], 3)
            torch.testing.assert_close(single[:, -1], everywhere[:, n], atol=1e-4, rtol=1e-4)


# -- training ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_peer_training_learns(trained, kind):
    metrics, out = trained[kind]
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    history = [r for r in log if "loss" in r]
    assert history[-1]["loss"] < 0.3 * history[0]["loss"]
    validation = metrics["validation"]
    assert len(validation["head_accuracy"]) == K  # EAGLE: its K draft steps, fed back as vLLM does
    assert max(history[0]["head_accuracy"]) < 0.1 and min(validation["head_accuracy"]) > 0.8, validation
    assert validation["est_accept_length"] > 3.0
    assert any("validation" in r for r in log[:-1])  # eval_every validated mid-run
    assert metrics["finished"] and (out / "loss_curve.png").stat().st_size > 0
    assert peer_kind(out / "draft") == kind


def test_export_formats(trained):
    """The folders hold what vLLM 0.32's loaders read (checked end to end in vLLM below)."""
    medusa_dir, eagle_dir = trained["medusa"][1] / "draft", trained["eagle"][1] / "draft"
    config = json.loads((medusa_dir / "config.json").read_text())
    assert config["model_type"] == "medusa" and config["num_heads"] == K
    assert config["medusa_fc_bias"] is True and config["original_lm_head"] is False
    assert sorted(load_file(medusa_dir / "model.safetensors")) == sorted(
        [f"blocks.{i}.layers.0.{p}" for i in range(K) for p in ("weight", "bias")]
        + [f"lm_heads.{i}.weight" for i in range(K)])
    config = json.loads((eagle_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["num_hidden_layers"] == 1
    weights = load_file(eagle_dir / "model.safetensors")
    assert "fc.weight" in weights and "layers.0.self_attn.q_proj.weight" in weights
    # The target's embedding and LM head are shared by vLLM, not stored; no input norm either.
    assert not any("embed" in k or "lm_head" in k or "input_layernorm" in k for k in weights)


@pytest.mark.parametrize("kind", KINDS)
def test_peer_resume_equals_uninterrupted(setup, tmp_path, kind):
    common = dict(epochs=2, save_every=3)
    whole = train(settings_for(setup, tmp_path / "whole", kind, **common))
    part = train(settings_for(setup, tmp_path / "part", kind, stop_at_step=5, **common))
    assert not part["finished"] and part["steps"] == 5
    resumed = train(settings_for(setup, tmp_path / "part", kind, **common))
    assert resumed["finished"] and resumed["steps"] == whole["steps"] == 16
    a = load_file(tmp_path / "whole" / "draft" / "model.safetensors")
    b = load_file(tmp_path / "part" / "draft" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["validation"] == whole["validation"]


def test_reduced_vocabulary_medusa_trains_on_the_frequent_tokens(setup, trained):
    """One trainable [V_DRAFT, d] LM head shared by the heads, on the tokens the target
    predicts most often (Chimera's choice, trainer.frequent_token_ids); accuracy compares
    target ids, so it approaches the share of labels inside the vocabulary."""
    metrics, out = trained["medusa-reduced"]
    history = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    history = [r for r in history if "loss" in r]
    assert history[-1]["loss"] < 0.3 * history[0]["loss"]
    assert metrics["validation"]["est_accept_length"] > 2.0
    assert min(metrics["validation"]["head_accuracy"]) > 0.6, metrics["validation"]
    heads = load_peer(out / "draft", setup["target"])
    _, _, train_data, _ = load_target_and_data(settings_for(setup, out, "medusa"), torch.device("cpu"))
    assert torch.equal(heads.token_map, frequent_token_ids(train_data, 128, V_DRAFT))
    weights = load_file(out / "draft" / "model.safetensors")
    assert weights["lm_heads.0.weight"].shape == (V_DRAFT, 128) and "lm_heads.1.weight" not in weights
    trained_rows = weights["lm_heads.0.weight"]  # trained, not the target's rows any more
    assert not torch.allclose(trained_rows, setup["target"].get_output_embeddings().weight[heads.token_map])


def test_medusa_shared_lm_head_trains_and_exports(setup, tmp_path):
    metrics = train(settings_for(setup, tmp_path / "run", "medusa", epochs=2,
                                 draft_overrides={"shared_lm_head": True}))
    config = json.loads((tmp_path / "run" / "draft" / "config.json").read_text())
    assert config["original_lm_head"] is True and metrics["finished"]
    assert "lm_heads.0.weight" in load_file(tmp_path / "run" / "draft" / "model.safetensors")
    heads = load_peer(tmp_path / "run" / "draft", setup["target"])
    assert isinstance(heads, MedusaHeads) and heads.shared_lm_head


def test_evaluate_an_exported_peer(setup, trained):
    metrics, out = trained["eagle"]
    argv = ["--target", setup["target_dir"], "--train-data", setup["train"],
            "--val-data", setup["val"], "--cache-dir", str(setup["root"] / "cache"),
            "--max-length", "64", "--output-dir", str(out / "eval"), "--evaluate", str(out / "draft")]
    assert train_main(argv) == 0
    evaluation = json.loads((out / "eval" / "evaluation.json").read_text())
    assert evaluation["draft_kind"] == "eagle"
    assert evaluation["validation"]["head_accuracy"] == pytest.approx(
        metrics["validation"]["head_accuracy"])


@pytest.mark.parametrize("overrides, message", [
    (dict(draft_kind="eagle", draft_overrides={"draft_vocab_size": 32}),
     "do not apply to eagle drafts .*full-vocabulary LM head"),
    (dict(draft_kind="medusa", draft_overrides={"draft_vocab_size": 0}), "positive integer"),
    (dict(draft_kind="medusa", draft_overrides={"vocab_size": 32}), "do not apply to medusa drafts"),
    (dict(draft_kind="eagle", use_trigram_encoder=False), "Chimera ablation"),
    (dict(draft_kind="hydra"), "draft_kind must be one of"),
])
def test_settings_refuse_what_a_peer_cannot_do(setup, tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        settings_for(setup, tmp_path, overrides.pop("draft_kind"), **overrides)


def test_cli_trains_a_peer_into_output_dir_draft(setup, tmp_path, capsys):
    argv = ["--target", setup["target_dir"], "--train-data", setup["train"], "--val-data", "none",
            "--cache-dir", str(setup["root"] / "cache"), "--max-length", "64", "--num-heads", "2",
            "--epochs", "1", "--no-progress", "--output-dir", str(tmp_path / "out")]
    assert train_main(argv + ["--draft-kind", "medusa", "--medusa-layers", "2",
                              "--draft-vocab-size", "64", "--medusa-shared-lm-head"]) == 0
    config = json.loads((tmp_path / "out" / "draft" / "config.json").read_text())
    assert config["num_heads"] == 2 and config["num_hidden_layers"] == 2
    assert config["truncated_vocab_size"] == 64 and config["original_lm_head"] is True
    with pytest.raises(SystemExit):
        train_main(argv + ["--draft-kind", "eagle", "--draft-vocab-size", "32"])
    assert "do not apply to eagle drafts" in capsys.readouterr().err


# -- inside vLLM -------------------------------------------------------------------------------
class PeerDrafter:
    """A peer as the reference decoder's Drafter (a chain: top-1 of each head / draft step),
    recomputed from all positions at every call."""

    def __init__(self, peer):
        self.peer, self.hidden = peer, []

    def reset(self) -> None:
        self.hidden = []

    @torch.no_grad()
    def propose(self, token_ids, new_hidden_states, top_k):
        self.hidden.append(new_hidden_states)
        h = torch.cat(self.hidden)  # [n + 1, d]: h_0 .. h_n
        if isinstance(self.peer, MedusaHeads):  # (a reduced vocabulary: back to target ids)
            return to_target_ids(self.peer.head_logits(h[-1]).topk(top_k, dim=-1).indices,
                                 self.peer.token_map)
        positions = torch.arange(h.shape[0])[None]
        _, logits = self.peer.rollout(token_ids[1:][None], h[None], positions, K)
        return logits[:, -1].topk(top_k, dim=-1).indices  # the rollout from n


@pytest.fixture(scope="module")
def vllm_prompts_and_plain(setup):
    pytest.importorskip("vllm")
    import vllm_utils  # noqa: F401  (sets VLLM_ENABLE_V1_MULTIPROCESSING before vLLM loads)
    from vllm import SamplingParams
    from vllm_utils import run_engine

    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, 128, (n,), generator=g).tolist() for n in (1, 4, 9, 17, 6, 30)]
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    return prompts, params, run_engine(setup["target_dir"], prompts, params)


@pytest.mark.parametrize("name", RUNS)
def test_exported_peer_runs_in_vllm_losslessly(setup, trained, vllm_prompts_and_plain, name):
    """vLLM's own method loads the export; greedy output = plain; and vLLM accepts exactly
    the tokens the reference decoder accepts with our PyTorch peer (so vLLM computes what
    we trained; with a reduced vocabulary, vLLM maps the drafts back through token_map)."""
    from vllm_chimera.harness.bench import BenchSettings, method_config
    from vllm_chimera.harness.offline import run_offline
    from vllm_utils import TEST_ENGINE

    kind = RUNS[name][0]
    prompts, params, plain = vllm_prompts_and_plain
    draft_dir = trained[name][1] / "draft"
    spec = method_config(kind, BenchSettings(target=setup["target_dir"], **{f"{kind}_draft": str(draft_dir)}))
    assert spec == {"method": kind, "model": str(draft_dir), "num_speculative_tokens": K}
    run = run_offline(setup["target_dir"], prompts, params, spec,
                      **TEST_ENGINE, **vllm_engine_kwargs(draft_dir))
    assert run.token_ids == plain.token_ids
    per_position = run.metrics["vllm:spec_decode_num_accepted_tokens_per_pos"]
    assert len(per_position) == K and min(per_position) > 0
    assert run.mean_acceptance_length > (2.0 if name == "medusa-reduced" else 3.0)  # of K + 1 = 4
    decoder = SpeculativeDecoder(setup["target"], PeerDrafter(load_peer(draft_dir, setup["target"])),
                                 TokenTree.chain(K))
    accepted = sum(n - 1 for prompt in prompts
                   for n in decoder.generate(torch.tensor(prompt), params.max_tokens).accept_lengths)
    assert run.counter("vllm:spec_decode_num_accepted_tokens") == accepted


def test_bench_needs_the_peer_drafts():
    pytest.importorskip("vllm")
    from vllm_chimera.harness.bench import BenchSettings, method_config

    with pytest.raises(ValueError, match="--eagle-draft DIR"):
        method_config("eagle", BenchSettings(target="t"))
    assert method_config("medusa", BenchSettings(target="t", medusa_draft="m",
                                                 num_speculative_tokens=2))["num_speculative_tokens"] == 2
