"""Chimera inside real vLLM engines (CPU, fp32): speculative output == plain output."""
from __future__ import annotations

import pytest
import torch

import vllm_utils  # noqa: F401  (sets VLLM_ENABLE_V1_MULTIPROCESSING before vLLM loads)
from conftest import build_permutation_pair, build_random_draft, build_vllm_target
from vllm_chimera.checkpoint import save_draft
from vllm_chimera.reference import ChimeraDrafter, SpeculativeDecoder
from vllm_chimera.tree import TokenTree
from vllm_utils import TEST_ENGINE, run_engine
from vllm_chimera.harness.offline import run_offline

vllm = pytest.importorskip("vllm")
from vllm import SamplingParams  # noqa: E402

GREEDY = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)


def _prompts(num_prompts, vocab, seed=0, lengths=(1, 3, 7, 12, 20, 33, 5, 48)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (lengths[i % len(lengths)],), generator=g).tolist()
            for i in range(num_prompts)]


@pytest.fixture(scope="module")
def random_pair(tmp_path_factory):
    """A random target and a random draft: nearly every draft token is rejected."""
    folder = tmp_path_factory.mktemp("random_pair")
    target = build_vllm_target(folder / "target")
    save_draft(build_random_draft(target, num_heads=4), folder / "draft")
    return folder / "target", folder / "draft"


@pytest.fixture(scope="module")
def permutation_pair(tmp_path_factory):
    """A target that follows a permutation and a draft that knows it (for 3/4 of tokens)."""
    folder = tmp_path_factory.mktemp("permutation_pair")
    target, draft, pi = build_permutation_pair(folder, num_heads=4, num_wrong=32)
    save_draft(draft, folder / "draft")
    return folder / "target", folder / "draft", target, draft


@pytest.fixture(scope="module")
def plain_random(random_pair):
    return run_engine(random_pair[0], _prompts(8, 256), GREEDY)


@pytest.mark.parametrize("num_prompts", [1, 8])
def test_random_draft_greedy_equals_plain(random_pair, plain_random, num_prompts):
    target_dir, draft_dir = random_pair
    spec = run_engine(target_dir, _prompts(num_prompts, 256), GREEDY, draft_dir)
    assert spec.token_ids == plain_random.token_ids[:num_prompts]
    assert spec.counter("vllm:spec_decode_num_drafts") > 0
    assert spec.acceptance_rate < 0.3  # mostly rejected: the rejection path is exercised


def test_accepting_draft_greedy_equals_plain_and_matches_reference(permutation_pair):
    target_dir, draft_dir, target, draft = permutation_pair
    prompts = _prompts(8, 128, seed=1)
    plain = run_engine(target_dir, prompts, GREEDY)
    spec = run_engine(target_dir, prompts, GREEDY, draft_dir)
    assert spec.token_ids == plain.token_ids
    assert spec.acceptance_rate > 0.5  # mostly accepted: the accept path is exercised
    per_position = spec.metrics["vllm:spec_decode_num_accepted_tokens_per_pos"]
    assert len(per_position) == 4 and min(per_position) > 0
    # The same drafts as the reference decoder: equal accepted-token counts overall.
    decoder = SpeculativeDecoder(target, ChimeraDrafter(draft), TokenTree.chain(4))
    reference_accepted = 0
    for prompt in prompts:
        result = decoder.generate(torch.tensor(prompt), GREEDY.max_tokens)
        reference_accepted += sum(n - 1 for n in result.accept_lengths)
    assert spec.counter("vllm:spec_decode_num_accepted_tokens") == reference_accepted


def test_chunked_prefill_and_preemption(random_pair, permutation_pair):
    """Long prompts split into 16-token chunks and a KV cache too small for the batch."""
    for target_dir, draft_dir, vocab in [(*random_pair, 256), (*permutation_pair[:2], 128)]:
        prompts = _prompts(8, vocab, seed=2, lengths=(60, 90, 45, 120))
        params = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
        small = dict(enable_chunked_prefill=True, max_num_batched_tokens=16, max_num_seqs=8,
                     kv_cache_memory_bytes=600 << 10, max_model_len=256)
        plain = run_engine(target_dir, prompts, params)
        spec = run_engine(target_dir, prompts, params, draft_dir, **small)
        assert spec.token_ids == plain.token_ids
        assert spec.counter("vllm:num_preemptions") > 0, "the KV cache did not force preemption"


def test_prefix_caching(permutation_pair):
    target_dir, draft_dir = permutation_pair[:2]
    shared = _prompts(1, 128, seed=3, lengths=(300,))[0]  # longer than a KV block (128 on CPU)
    prompts = [shared + tail for tail in _prompts(6, 128, seed=4)]
    plain = run_engine(target_dir, prompts, GREEDY)
    # The same prompts twice in one engine: the second round hits the prefix cache.
    spec = run_engine(target_dir, prompts, GREEDY, draft_dir, num_rounds=2,
                      enable_prefix_caching=True)
    assert spec.token_ids == plain.token_ids + plain.token_ids
    assert spec.counter("vllm:prefix_cache_hits") > 0


def test_sampling_follows_the_target_distribution(tmp_path):
    """Temperature 0.8: how often token t+1 = pi(token t), with and without Chimera.

    The target puts about 1/2 of its mass on pi(x) and spreads the rest; the draft
    proposes the pi-path, which the acceptance rule keeps only as often as the target
    itself would go that way. 600 sequences x 6 tokens
    give 3000 transitions per run: the standard error of each rate is about 0.01, the
    tolerance 0.04. Accepting every draft would push Chimera's rate towards 1.
    """
    target, draft, pi = build_permutation_pair(tmp_path, num_heads=3, logit_scale=0.34)
    save_draft(draft, tmp_path / "draft")
    prompts = _prompts(600, 128, seed=5, lengths=(4, 9))
    rates = {}
    for name, draft_dir in [("plain", None), ("chimera", tmp_path / "draft")]:
        # (Unseeded: Chimera drafts nothing for seeded requests; the engine's seed keeps
        # the run repeatable.)
        params = SamplingParams(temperature=0.8, max_tokens=6, ignore_eos=True)
        run = run_engine(tmp_path / "target", prompts, params, draft_dir)
        follows = [int(pi[seq[j]]) == seq[j + 1] for seq in run.token_ids for j in range(5)]
        rates[name] = sum(follows) / len(follows)
        if draft_dir is not None:
            # The draft follows pi from x_n and ignores x_{n+1}; after a rejection the
            # bonus token is never pi(x_n), so drafts land mostly after full acceptances.
            assert run.counter("vllm:spec_decode_num_accepted_tokens") > 100
    assert 0.35 < rates["plain"] < 0.65, rates
    assert abs(rates["chimera"] - rates["plain"]) < 0.04, rates


def test_reduced_draft_vocabulary_in_vllm(permutation_pair, tmp_path):
    """A draft with its own (reduced) LM head maps head outputs back to target ids.

    The reduced head here holds every token, shuffled: rows of the target's LM head in a
    random order, with draft_to_target_ids the order. It drafts exactly what the
    full-vocabulary draft drafts, so a wrong id map would show as lost acceptances (and a
    missing map as wrong tokens, which verification would reject, not emit).
    """
    from vllm_chimera.checkpoint import target_embed_and_lm_head
    from vllm_chimera.model import ChimeraDraftModel

    target_dir, draft_dir, target, draft = permutation_pair
    config = type(draft.config).from_dict({**draft.config.to_dict(), "draft_vocab_size": 128})
    reduced = ChimeraDraftModel(config)
    missing, unexpected = reduced.load_state_dict(draft.state_dict(), strict=False)
    assert set(missing) == {"draft_lm_head.weight", "draft_to_target_ids"} and not unexpected
    shuffled = torch.randperm(128, generator=torch.Generator().manual_seed(7))
    reduced.bind_target(*target_embed_and_lm_head(target), frequent_token_ids=shuffled)
    save_draft(reduced, tmp_path / "reduced")
    prompts = _prompts(4, 128, seed=6)
    plain = run_engine(target_dir, prompts, GREEDY)
    full = run_engine(target_dir, prompts, GREEDY, draft_dir)
    spec = run_engine(target_dir, prompts, GREEDY, tmp_path / "reduced")
    assert spec.token_ids == plain.token_ids
    assert spec.acceptance_rate > 0.5
    assert (spec.counter("vllm:spec_decode_num_accepted_tokens")
            == full.counter("vllm:spec_decode_num_accepted_tokens"))


def test_batch_size_schedule_steps_aside(permutation_pair):
    """vLLM's dynamic schedule (num_speculative_tokens_per_batch_size) drives Chimera's K:
    all 4 heads alone, 2 at batch 2-4, none (plain decoding, draft KV still kept) above."""
    target_dir, draft_dir = permutation_pair[:2]
    schedule = [(1, 1, 4), (2, 4, 2), (5, 64, 0)]
    for num_prompts, k in [(1, 4), (3, 2), (8, 0)]:
        prompts = _prompts(num_prompts, 128, seed=8)
        plain = run_engine(target_dir, prompts, GREEDY)
        spec = run_offline(target_dir, prompts, GREEDY, {
            "method": "chimera", "model": str(draft_dir),
            "num_speculative_tokens_per_batch_size": schedule}, **TEST_ENGINE)
        assert spec.token_ids == plain.token_ids, num_prompts
        drafts = spec.counter("vllm:spec_decode_num_drafts")
        assert spec.counter("vllm:spec_decode_num_draft_tokens") == k * drafts, num_prompts
        assert (drafts > 0) == (k > 0), num_prompts


def test_stepping_aside_skips_the_draft_unless_told_to_keep_its_kv(permutation_pair, monkeypatch):
    """At K=0 the proposer does no draft work (one draft pass per step saved); with
    VLLM_CHIMERA_ASIDE_KEEPS_KV=1 it still runs the encoder pass every step. Both lossless."""
    from vllm_chimera.vllm.model import ChimeraDraftForVLLM
    from vllm_chimera.vllm.proposer import ASIDE_KEEPS_KV_ENV

    target_dir, draft_dir = permutation_pair[:2]
    prompts = _prompts(2, 128, seed=10)
    plain = run_engine(target_dir, prompts, GREEDY)
    calls = []
    forward = ChimeraDraftForVLLM.forward
    monkeypatch.setattr(ChimeraDraftForVLLM, "forward",
                        lambda self, *a, **k: (calls.append(1), forward(self, *a, **k))[1])
    passes = {}
    for keep in ("0", "1"):
        monkeypatch.setenv(ASIDE_KEEPS_KV_ENV, keep)
        calls.clear()
        spec = run_offline(target_dir, prompts, GREEDY, {
            "method": "chimera", "model": str(draft_dir), "num_speculative_tokens": 2,
            "num_speculative_tokens_per_batch_size": [(1, 64, 0)]}, **TEST_ENGINE)
        assert spec.token_ids == plain.token_ids, keep
        assert spec.counter("vllm:spec_decode_num_draft_tokens") == 0, keep
        passes[keep] = len(calls)  # start-up warm-up passes + any per-step passes
    # 2 requests x 40 tokens in one batch: at least 39 decode steps, each one pass when kept.
    assert passes["1"] - passes["0"] >= 39


def test_stepped_aside_sampling_is_plain_sampling(permutation_pair, monkeypatch):
    """Sampled requests with Chimera stepped aside (K=0) give exactly plain vLLM's tokens
    (the engine's seed; per-request seeds would make Chimera draft nothing anyway), and the
    batch is sampled without vLLM's full verification (which draws a vocabulary-sized
    exponential per request for nothing; RejectionSamplerPatch)."""
    from vllm.v1.sample import rejection_sampler

    target_dir, draft_dir = permutation_pair[:2]
    prompts = _prompts(3, 128, seed=12)
    params = SamplingParams(temperature=0.9, max_tokens=24, ignore_eos=True)
    plain = run_engine(target_dir, prompts, params)
    verified = []
    sample = rejection_sampler.rejection_sample
    monkeypatch.setattr(rejection_sampler, "rejection_sample",
                        lambda *a, **k: (verified.append(1), sample(*a, **k))[1])
    aside = run_offline(target_dir, prompts, params, {
        "method": "chimera", "model": str(draft_dir), "num_speculative_tokens": 2,
        "num_speculative_tokens_per_batch_size": [(1, 64, 0)]}, **TEST_ENGINE)
    assert aside.token_ids == plain.token_ids
    assert not verified
    drafting = run_offline(target_dir, prompts, params, {  # the counter can count
        "method": "chimera", "model": str(draft_dir), "num_speculative_tokens": 2},
        **TEST_ENGINE)
    assert verified and drafting.counter("vllm:spec_decode_num_draft_tokens") > 0


def test_draft_schedule_is_the_default_and_a_fixed_k_overrides_it(permutation_pair, tmp_path):
    """A step-aside schedule stored in the draft (chimera-bench --save-schedule) is what vLLM
    uses when the user gives no K; num_speculative_tokens=K means K at every batch size."""
    import shutil

    from vllm_chimera.measurements import load_measurements
    from vllm_chimera.harness.bench import save_schedule

    target_dir, draft_dir = permutation_pair[:2]
    shutil.copytree(draft_dir, tmp_path / "draft")
    save_schedule([[1, 1, 2], [2, 64, 0]], tmp_path / "draft", device_type="cpu")
    assert load_measurements(tmp_path / "draft")["cpu"].step_aside_schedule == [[1, 1, 2], [2, 64, 0]]
    for num_prompts, fixed_k, k in [(1, None, 2), (8, None, 0), (8, 3, 3)]:
        prompts = _prompts(num_prompts, 128, seed=9)
        plain = run_engine(target_dir, prompts, GREEDY)
        # (No lookup: its drafts have their own lengths; K here is the heads'.)
        config = {"method": "chimera", "model": str(tmp_path / "draft"), "lookup": False}
        if fixed_k:
            config["num_speculative_tokens"] = fixed_k
        spec = run_offline(target_dir, prompts, GREEDY, config, **TEST_ENGINE)
        assert spec.token_ids == plain.token_ids, (num_prompts, fixed_k)
        drafts = spec.counter("vllm:spec_decode_num_drafts")
        assert spec.counter("vllm:spec_decode_num_draft_tokens") == k * drafts, (num_prompts, fixed_k)
        assert (drafts > 0) == (k > 0), (num_prompts, fixed_k)


@pytest.mark.parametrize("ablation", ["use_context_encoder", "use_trigram_encoder"])
def test_ablation_drafts_run_in_vllm(random_pair, plain_random, tmp_path, ablation):
    """The paper's ablations load and stay lossless in vLLM; without the context layer the
    draft has no attention layer and no KV cache of its own."""
    from transformers import AutoModelForCausalLM

    target = AutoModelForCausalLM.from_pretrained(random_pair[0], dtype=torch.float32)
    save_draft(build_random_draft(target, num_heads=3, **{ablation: False}), tmp_path / "draft")
    spec = run_engine(random_pair[0], _prompts(8, 256), GREEDY, tmp_path / "draft")
    assert spec.token_ids == plain_random.token_ids
    assert spec.counter("vllm:spec_decode_num_draft_tokens") == 3 * spec.counter(
        "vllm:spec_decode_num_drafts") > 0


def test_no_context_draft_is_accepted_in_vllm(permutation_pair, tmp_path):
    """The permutation draft's heads read h alone, so without its context layer it still
    knows the target's continuation: its drafts must be accepted inside vLLM too (a
    proposer that got no attention metadata for it used to zero every draft)."""
    from vllm_chimera.checkpoint import target_embed_and_lm_head
    from vllm_chimera.model import ChimeraDraftModel

    target_dir, _, target, draft = permutation_pair
    config = type(draft.config).from_dict({**draft.config.to_dict(), "use_context_encoder": False})
    no_context = ChimeraDraftModel(config)
    no_context.load_state_dict(draft.state_dict(), strict=False)  # the heads; no encoder
    save_draft(no_context.bind_target(*target_embed_and_lm_head(target)), tmp_path / "nc")
    prompts = _prompts(4, 128, seed=9)
    spec = run_engine(target_dir, prompts, GREEDY, tmp_path / "nc")
    assert spec.token_ids == run_engine(target_dir, prompts, GREEDY).token_ids
    assert spec.acceptance_rate > 0.5


def _deeper_permutation_draft(target, draft, zero_extra_layer=False):
    """The permutation draft with a second encoder layer (random) and heads that also read
    s, so that which drafts are right depends on what both encoder layers compute."""
    from vllm_chimera.checkpoint import target_embed_and_lm_head
    from vllm_chimera.model import ChimeraDraftModel

    d = draft.config.hidden_size
    config = type(draft.config).from_dict({**draft.config.to_dict(), "num_encoder_layers": 2})
    torch.manual_seed(3)
    deeper = ChimeraDraftModel(config)
    for weight in deeper.extra_layers.parameters():
        torch.nn.init.normal_(weight, std=0.3)
    deeper.load_state_dict(draft.state_dict(), strict=False)  # all but extra_layers
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for head in deeper.heads:  # up's s columns: zero in the permutation draft
            head.up.weight[:, d:] = 20.0 * torch.randn(d, d, generator=g) / d ** 0.5
        if zero_extra_layer:  # the second layer as the identity
            deeper.extra_layers[0].self_attn.o_proj.weight.zero_()
            deeper.extra_layers[0].mlp.down_proj.weight.zero_()
    return deeper.bind_target(*target_embed_and_lm_head(target)).eval()


def test_deeper_encoder_in_vllm_drafts_as_the_reference_does(permutation_pair, tmp_path):
    """A two-layer encoder inside vLLM (a second draft KV layer): output = plain, and the
    accepted count equals the reference decoder's, which a draft without its second layer
    does not reach (so a vLLM model that skipped or misfed the layer would fail here)."""
    target_dir, _, target, draft = permutation_pair
    prompts = _prompts(6, 128, seed=1)
    deeper = _deeper_permutation_draft(target, draft)
    save_draft(deeper, tmp_path / "deeper")
    plain = run_engine(target_dir, prompts, GREEDY)
    spec = run_engine(target_dir, prompts, GREEDY, tmp_path / "deeper")
    assert spec.token_ids == plain.token_ids

    def reference_accepted(drafter_model):
        decoder = SpeculativeDecoder(target, ChimeraDrafter(drafter_model), TokenTree.chain(4))
        return sum(sum(n - 1 for n in decoder.generate(torch.tensor(p), GREEDY.max_tokens).accept_lengths)
                   for p in prompts)

    accepted = reference_accepted(deeper)
    assert spec.counter("vllm:spec_decode_num_accepted_tokens") == accepted > 20
    assert reference_accepted(_deeper_permutation_draft(target, draft, zero_extra_layer=True)) != accepted
