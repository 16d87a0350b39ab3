"""chimera-bench --measure-tree: what speculative_config tree "auto" needs, measured in vLLM.

One engine (a fresh process) with the draft, the lookup off and room for the largest tree.
Its proposer's tree and K are then switched between runs (`_set_drafting`, through
`LLM.collective_rpc`), so every setting runs on the same engine, prompts and warm caches:

1. Accuracies: every prompt at batch 1 with the spine tree (the top-1 chain plus every rank
   up to top_k under each chain node, tree.spine_paths); tree_verify.STATS counts each
   node's acceptances, and tree.spine_accuracies turns them into head i's rank-r accuracy
   given the chain before it: `head_top_k_accuracies`.
2. Cost and rate: at each batch size, no drafts, the chain at every K and the best tree
   (tree.best_paths on those accuracies) of each size; tokens per second and seconds per
   engine step of each. Batch 1's step seconds per verified token count are
   `tree_step_seconds`; the fastest setting per batch size gives `tree_schedule` (the
   tree's size where a tree wins, 0 where no drafts or a chain do: then the step-aside
   schedule's K applies).

The prompts are the held-out ShareGPT first turns (prepare.datasets.heldout_prompts), not
the benchmark's MT-bench ones. `--save-schedule` stores the results in the draft's
measurements.json for this device type (save_tree_settings).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

from vllm import LLM, SamplingParams
from vllm.platforms import current_platform

from vllm_chimera.checkpoint import load_config
from vllm_chimera.measurements import save_measurements
from vllm_chimera.tree import best_paths, best_tree, spine_accuracies, spine_paths
from vllm_chimera.vllm import patching, tree_verify
from vllm_chimera.harness.offline import ENGINE_DEFAULTS
from vllm_chimera.harness.step_timing import StepTimingPatch
from vllm_chimera.vllm.spec_config import TreeSettings


@dataclass
class TreeMeasureSettings:
    top_k: int = 4  # ranks measured per head
    # Tree sizes timed, in verified tokens (root + drafted nodes).
    tree_sizes: tuple[int, ...] = (2, 3, 4, 6, 8, 12, 16, 32, 64)
    num_prompts: int = 16
    max_tokens: int = 64


def _set_drafting(worker, paths, num_head_tokens: int) -> None:
    """(In the worker) draft the tree of `paths` (None: a chain) with K heads' tokens."""
    drafter = worker.model_runner.drafter
    drafter.tree = None if paths is None else TreeSettings(tuple(tuple(p) for p in paths))
    drafter.num_head_tokens = num_head_tokens


def _run(llm, prompts, params, batch_size: int, prefill: dict | None = None) -> dict:
    """Timings of the prompts sent batch_size at a time. With `prefill` (the same prompts'
    run at max_tokens=1: their prefill steps alone), decode_step_seconds leaves those out."""
    StepTimingPatch.reset()
    num_tokens, start = 0, time.perf_counter()
    for i in range(0, len(prompts), batch_size):
        outputs = llm.generate(prompts[i: i + batch_size], params, use_tqdm=False)
        num_tokens += sum(len(o.outputs[0].token_ids) for o in outputs)
    seconds = time.perf_counter() - start
    totals = StepTimingPatch.totals
    steps = max(totals["num_forward"], 1)
    row = {"output_tokens": num_tokens, "seconds": seconds, "num_steps": totals["num_forward"],
           "tokens_per_second": num_tokens / seconds, "tokens_per_step": num_tokens / steps,
           "step_seconds": seconds / steps, "draft_seconds_per_step": totals["draft_s"] / steps}
    if prefill is not None:
        row["decode_step_seconds"] = ((seconds - prefill["seconds"])
                                      / max(steps - prefill["num_steps"], 1))
    return row


def measure_tree(bench_settings, settings: TreeMeasureSettings, prompts) -> dict:
    """Run both measurements (see the module's docstring) in this process; returns the
    report `tree_results` turns into the draft's settings."""
    if not patching.is_applied(StepTimingPatch):
        patching.apply(StepTimingPatch)
    num_heads = load_config(bench_settings.draft).num_decoding_heads
    max_size = max(settings.tree_sizes)
    spine = spine_paths(num_heads, settings.top_k)
    # The engine is sized for the largest tree measured (any tree of that many nodes).
    room = max(max_size - 1, len(spine))
    startup = best_paths([[1.0 / (rank + 2) for rank in range(settings.top_k)]] * num_heads, room + 1)
    llm = LLM(model=str(bench_settings.target), speculative_config={
        "method": "chimera", "model": str(bench_settings.draft), "lookup": False,
        "num_speculative_tokens": num_heads, "tree": [list(p) for p in startup]},
        **{**ENGINE_DEFAULTS, **bench_settings.engine_kwargs})
    greedy = SamplingParams(temperature=0.0, max_tokens=settings.max_tokens)
    try:
        llm.generate(prompts[:1], greedy, use_tqdm=False)  # warm-up
        llm.collective_rpc(_set_drafting, args=(spine, num_heads))
        tree_verify.STATS.reset()
        spine_run = _run(llm, prompts, greedy, 1)
        stats = tree_verify.STATS
        accuracies = spine_accuracies(stats.num_accepted_per_path, stats.num_trees, num_heads,
                                      settings.top_k)
        paths = best_paths(accuracies, max_size)
        rows = []
        first_token = SamplingParams(temperature=0.0, max_tokens=1)
        for batch_size in bench_settings.batch_sizes:
            llm.collective_rpc(_set_drafting, args=(None, 0))
            prefill = _run(llm, prompts, first_token, batch_size)
            for kind, size in ([("none", 1)] + [("chain", k + 1) for k in range(1, num_heads + 1)]
                               + [("tree", n) for n in settings.tree_sizes if n - 1 <= len(paths)]):
                if kind == "tree":
                    llm.collective_rpc(_set_drafting, args=(paths[: size - 1], num_heads))
                else:
                    llm.collective_rpc(_set_drafting, args=(None, size - 1))
                row = _run(llm, prompts, greedy, batch_size, prefill)
                rows.append({"batch_size": batch_size, "kind": kind, "num_tokens": size, **row})
                print(f"chimera-bench --measure-tree: batch {batch_size} {kind} {size}: "
                      f"{row['tokens_per_second']:.1f} tok/s, {row['tokens_per_step']:.2f} "
                      f"tokens/step, {1000 * row['decode_step_seconds']:.1f} ms/decode step", flush=True)
    finally:
        del llm
    return {"settings": asdict(settings), "num_prompts": len(prompts),
            "spine": {"num_trees": stats.num_trees, "tokens_per_second": spine_run["tokens_per_second"]},
            "head_top_k_accuracies": accuracies, "paths": [list(p) for p in paths], "rows": rows}


def tree_results(report: dict) -> dict:
    """The draft's settings from a measure_tree report: tree_step_seconds (batch 1's
    decode steps, by verified tokens: the no-draft step, then the trees), the expected-best tree size at
    batch 1 (what "auto" picks without a schedule), and tree_schedule by batch size.

    A batch size's entry is the size of its fastest tree when that tree beats no drafts
    and every chain measured there, else 0. Ranges end at measured batch sizes, as in the
    step-aside schedule. e.g. measured 1: tree 8 fastest, 4: tree 4, 16: chain K=1 ->
    [[1, 1, 8], [2, 4, 4], [5, 16, 0]]
    """
    rows = report["rows"]
    batch_sizes = sorted({row["batch_size"] for row in rows})
    step_seconds = {row["num_tokens"]: row["decode_step_seconds"] for row in rows
                    if row["batch_size"] == batch_sizes[0] and row["kind"] in ("none", "tree")}
    schedule, start = [], 1
    for batch_size in batch_sizes:
        at_batch = [row for row in rows if row["batch_size"] == batch_size]
        fastest = max(at_batch, key=lambda row: row["tokens_per_second"])
        schedule.append([start, batch_size, fastest["num_tokens"] if fastest["kind"] == "tree" else 0])
        start = batch_size + 1
    expected = best_tree(report["head_top_k_accuracies"], step_seconds)
    return {"head_top_k_accuracies": report["head_top_k_accuracies"],
            "tree_step_seconds": {str(n): s for n, s in sorted(step_seconds.items())},
            "expected_best_num_nodes": expected.num_nodes, "tree_schedule": schedule}


def save_tree_settings(results: dict, draft_dir, device_type: str | None = None) -> Path:
    """Store the measured accuracies, step times and tree schedule in the draft's
    measurements.json, for `device_type` (default: this machine's, as vLLM sees it)."""
    return save_measurements(
        draft_dir, device_type or current_platform.device_type,
        head_top_k_accuracies=results["head_top_k_accuracies"],
        tree_step_seconds=results["tree_step_seconds"], tree_schedule=results["tree_schedule"])


def markdown(report: dict, results: dict) -> str:
    accuracies = report["head_top_k_accuracies"]
    lines = [f"Per-head top-{len(accuracies[0])} accuracies (given the top-1 chain before it; "
             f"{report['spine']['num_trees']} spine trees on {report['num_prompts']} held-out "
             "prompts):", "", "| head | " + " | ".join(f"rank {r}" for r in range(len(accuracies[0])))
             + " |", "|---" * (len(accuracies[0]) + 1) + "|"]
    lines += [f"| {i} | " + " | ".join(f"{a:.3f}" for a in head) + " |" for i, head in enumerate(accuracies)]
    lines += ["", "Each setting on the same engine and prompts, greedy; tokens per engine step and "
              "milliseconds per decode step (the prompts' prefill steps, timed alone, taken out).", "",
              "| batch | drafts | verified tokens | tok/s | tokens/step | ms/decode step | draft ms/step |",
              "|---|---|---|---|---|---|---|"]
    for row in report["rows"]:
        lines.append(f"| {row['batch_size']} | {row['kind']} | {row['num_tokens']} | "
                     f"{row['tokens_per_second']:.1f} | {row['tokens_per_step']:.2f} | "
                     f"{1000 * row['decode_step_seconds']:.1f} | {1000 * row['draft_seconds_per_step']:.1f} |")
    lines += ["", f"Tree schedule (batch from, to, tree size; 0 = no tree): {results['tree_schedule']}; "
              f"the best batch-1 tree by expected tokens per second: {results['expected_best_num_nodes']} "
              "verified tokens."]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    # (matplotlib, an optional dependency: imported only to plot)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_rate, ax_cost) = plt.subplots(1, 2, figsize=(10, 4))
    for batch_size in sorted({row["batch_size"] for row in report["rows"]}):
        for kind, style in (("tree", "-o"), ("chain", "--s")):
            rows = [r for r in report["rows"] if r["batch_size"] == batch_size and r["kind"] in (kind, "none")]
            sizes = [r["num_tokens"] for r in rows]
            ax_rate.plot(sizes, [r["tokens_per_second"] for r in rows], style, label=f"batch {batch_size} {kind}")
            ax_cost.plot(sizes, [1000 * r["decode_step_seconds"] for r in rows], style,
                         label=f"batch {batch_size} {kind}")
    for ax, title, label in ((ax_rate, "tokens per second", "tok/s"),
                             (ax_cost, "decode step time", "ms per decode step")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("verified tokens per request (root + drafts)")
        ax.set_ylabel(label)
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
