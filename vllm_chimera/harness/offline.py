"""Offline runs of vLLM with and without Chimera, measured the same way (demo, tests, bench).

`run_offline` starts one engine, generates, reads vLLM's own spec-decode counters and shuts
the engine down; `compare` runs plain decoding and Chimera side by side in one process so
their ratio is measured on the same machine state.
"""
from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field

from vllm.platforms import current_platform


def _engine_defaults() -> dict:
    """vLLM's own defaults, the way users run it: compile mode on CPU, CUDA graphs and the
    model's dtype on GPU (never enforce_eager: it flatters a drafter whose own pass is not
    compiled). On CPU, fp32 (bf16 is slower on a CPU without AVX-512-BF16/AMX) and an
    explicit KV cache size, which vLLM needs there."""
    defaults = dict(max_model_len=2048, seed=0, disable_log_stats=False)
    if current_platform.is_cpu():
        defaults.update(dtype="float32", kv_cache_memory_bytes=256 << 20)
    return defaults


ENGINE_DEFAULTS = _engine_defaults()


@dataclass
class OfflineRun:
    token_ids: list[list[int]]  # one list per completion, in prompt order
    metrics: dict[str, object] = field(default_factory=dict)
    startup_seconds: float = 0.0
    generate_seconds: float = 0.0
    texts: list[str] = field(default_factory=list)

    def counter(self, name: str) -> float:
        return self.metrics.get(name, 0)

    @property
    def num_output_tokens(self) -> int:
        return sum(len(t) for t in self.token_ids)

    @property
    def tokens_per_second(self) -> float:
        return self.num_output_tokens / max(self.generate_seconds, 1e-9)

    @property
    def acceptance_rate(self) -> float:
        drafted = self.counter("vllm:spec_decode_num_draft_tokens")
        return self.counter("vllm:spec_decode_num_accepted_tokens") / max(drafted, 1)

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens per target step with a draft, the bonus token included."""
        num_drafts = self.counter("vllm:spec_decode_num_drafts")
        if not num_drafts:
            return 1.0
        return 1.0 + self.counter("vllm:spec_decode_num_accepted_tokens") / num_drafts


def _read_metrics(llm) -> dict[str, object]:
    metrics = {}
    for metric in llm.get_metrics():
        if hasattr(metric, "values"):
            metrics[metric.name] = list(metric.values)
        elif hasattr(metric, "value"):
            metrics[metric.name] = metric.value
    return metrics


def run_offline(target: str, prompts, sampling_params, speculative_config: dict | None = None,
                num_rounds: int = 1, **engine_kwargs) -> OfflineRun:
    """prompts: token-id lists or strings. Generates `num_rounds` times in one engine."""
    from vllm import LLM

    start = time.perf_counter()
    llm = LLM(model=str(target), speculative_config=speculative_config,
              **{**ENGINE_DEFAULTS, **engine_kwargs})
    run = OfflineRun([], startup_seconds=time.perf_counter() - start)
    inputs = [p if isinstance(p, str) else {"prompt_token_ids": list(p)} for p in prompts]
    try:
        start = time.perf_counter()
        for _ in range(num_rounds):
            for output in llm.generate(inputs, sampling_params, use_tqdm=False):
                run.token_ids += [list(c.token_ids) for c in output.outputs]
                run.texts += [c.text for c in output.outputs]
        run.generate_seconds = time.perf_counter() - start
        run.metrics = _read_metrics(llm)
        return run
    finally:
        del llm
        gc.collect()


def compare(target: str, draft: str, prompts, sampling_params, num_speculative_tokens=None,
            **engine_kwargs) -> dict[str, OfflineRun]:
    """Plain decoding, then Chimera, in this process: {"plain": run, "chimera": run}."""
    spec = {"method": "chimera", "model": str(draft)}
    if num_speculative_tokens is not None:
        spec["num_speculative_tokens"] = num_speculative_tokens
    return {"plain": run_offline(target, prompts, sampling_params, None, **engine_kwargs),
            "chimera": run_offline(target, prompts, sampling_params, spec, **engine_kwargs)}
