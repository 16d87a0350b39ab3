"""The draft's encoder pass compiled by vLLM (ChimeraEncoder, `support_torch_compile`).

In compile mode (vLLM's default on CPU) the encoder pass must run as vLLM's compiled
graph, not eagerly, and stay lossless: greedy output identical to plain vLLM in compile
mode, for chains (lookup off and on) and trees, over a batch of requests of different
lengths. Padded draft batches (what vLLM does on GPU to reach a CUDA-graph size; the CPU
never pads, so a test pads by hand) must draft exactly what the unpadded batch drafts.
"""
from __future__ import annotations

import pytest
import torch

import vllm_utils  # noqa: F401  (sets VLLM_ENABLE_V1_MULTIPROCESSING before vLLM loads)
from conftest import build_random_draft, build_vllm_target
from vllm_chimera.checkpoint import save_draft
from vllm_utils import run_engine

vllm = pytest.importorskip("vllm")
from vllm import SamplingParams  # noqa: E402

from vllm_chimera.vllm.model import ChimeraEncoder  # noqa: E402
from vllm_chimera.vllm.proposer import ChimeraProposer  # noqa: E402

pytestmark = pytest.mark.slow

VOCAB = 32  # small: random continuations repeat, so the lookup finds matches
SEVEN_NODE_TREE = [[0], [1], [0, 0], [1, 0], [0, 0, 0], [0, 1]]  # root + 6 drafted nodes
GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
COMPILE_MODE = dict(enforce_eager=False)  # vLLM's default compilation on CPU
PAD_TO = 8  # the padded test rounds every draft batch up to a multiple of this


def _prompts():
    g = torch.Generator().manual_seed(5)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (1, 3, 7, 12, 20, 33)]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    folder = tmp_path_factory.mktemp("compiled_draft")
    target = build_vllm_target(folder / "target", vocab_size=VOCAB)
    # Random weights everywhere: every draft token depends on the encoder's output s.
    save_draft(build_random_draft(target, num_heads=4), folder / "draft")
    save_draft(build_random_draft(target, num_heads=4, use_trigram_encoder=False),
               folder / "no_trigram")
    return folder


@pytest.fixture(scope="module")
def plain(folders):
    return run_engine(folders / "target", _prompts(), GREEDY, **COMPILE_MODE)


class _Probe:
    """Records every proposal's drafts, and how many times the encoder's eager Python
    code (`ChimeraEncoder._trigram`) ran after start-up. In compile mode that must be
    never: once vLLM has compiled the module at warm-up, its graph runs instead."""

    def __init__(self, monkeypatch):
        self.drafts: list[list[list[int]]] = []
        self.encoder = None
        self.eager_trigram_calls = 0
        propose = ChimeraProposer.propose
        trigram = ChimeraEncoder._trigram

        def counted_trigram(encoder, *args, **kwargs):
            self.eager_trigram_calls += 1
            return trigram(encoder, *args, **kwargs)

        def recorded_propose(proposer, *args, **kwargs):
            if self.encoder is None:  # the first step: start-up (and compilation) is over
                self.encoder = proposer.model.encoder
                monkeypatch.setattr(ChimeraEncoder, "_trigram", counted_trigram)
            drafts = propose(proposer, *args, **kwargs)
            self.drafts.append(drafts.tolist() if isinstance(drafts, torch.Tensor) else drafts)
            return drafts

        monkeypatch.setattr(ChimeraProposer, "propose", recorded_propose)

    def assert_compiled(self):
        assert self.drafts, "the proposer never ran"
        assert not getattr(self.encoder, "do_not_compile", True), "the encoder is not compiled"
        assert getattr(self.encoder, "compiled", False), "the encoder was never compiled"
        assert self.eager_trigram_calls == 0, (
            f"the encoder's eager code ran {self.eager_trigram_calls} times in "
            f"{len(self.drafts)} steps: the compiled graph was not used")


def _run(folders, monkeypatch, draft="draft", **kwargs):
    probe = _Probe(monkeypatch)
    run = run_engine(folders / "target", _prompts(), GREEDY, folders / draft, **kwargs)
    return run, probe


@pytest.fixture(scope="module")
def chain_run(folders):
    with pytest.MonkeyPatch.context() as monkeypatch:
        return _run(folders, monkeypatch, **COMPILE_MODE)


def test_compiled_chain_equals_plain_and_runs_the_compiled_encoder(chain_run, plain):
    run, probe = chain_run
    assert run.token_ids == plain.token_ids
    assert run.counter("vllm:spec_decode_num_drafts") > 0
    probe.assert_compiled()


@pytest.mark.parametrize("options", [dict(lookup=True), dict(tree=SEVEN_NODE_TREE),
                                     dict(draft="no_trigram")],
                         ids=["lookup", "tree", "no_trigram"])
def test_compiled_draft_equals_plain(folders, plain, monkeypatch, options):
    run, probe = _run(folders, monkeypatch, **options, **COMPILE_MODE)
    assert run.token_ids == plain.token_ids
    assert run.counter("vllm:spec_decode_num_drafts") > 0
    assert getattr(probe.encoder, "compiled", False), "the encoder was never compiled"
    if options.get("draft") != "no_trigram":  # (without it, _trigram is never called)
        probe.assert_compiled()


def test_eager_engine_runs_the_encoder_eagerly(folders, plain, monkeypatch):
    """The probe can tell: an eager engine runs the encoder's Python code every step."""
    run, probe = _run(folders, monkeypatch)  # TEST_ENGINE: enforce_eager=True
    assert run.token_ids == plain.token_ids
    assert probe.encoder.do_not_compile
    assert probe.eager_trigram_calls == len(probe.drafts) > 0


def test_padded_draft_batches_draft_what_unpadded_ones_draft(folders, chain_run, plain,
                                                             monkeypatch):
    """Every draft batch padded up to a multiple of PAD_TO rows, as vLLM pads to CUDA-graph
    sizes: the padded rows get window ids 0, stale positions and hidden states and the
    padding slot, so the drafts of every step equal the unpadded run's (a padded row that
    wrote KV into a real slot, or leaked into a real row, would change them)."""
    determine = ChimeraProposer._determine_batch_execution_and_padding
    paddings = []

    def padded(proposer, num_tokens, use_cudagraphs=True):
        mode, _, across_dp = determine(proposer, num_tokens, use_cudagraphs=use_cudagraphs)
        num_input_tokens = min(-(-num_tokens // PAD_TO) * PAD_TO, proposer.max_num_tokens)
        paddings.append(num_input_tokens - num_tokens)
        return mode, num_input_tokens, across_dp

    monkeypatch.setattr(ChimeraProposer, "_determine_batch_execution_and_padding", padded)
    run, probe = _run(folders, monkeypatch, **COMPILE_MODE)
    assert sum(1 for rows in paddings if rows > 0) > 5, paddings
    assert run.token_ids == plain.token_ids
    probe.assert_compiled()
    assert probe.drafts == chain_run[1].drafts
