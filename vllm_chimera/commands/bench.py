"""chimera-bench: every method vLLM offers and Chimera, side by side in one run (one engine
per method, each in a fresh process), at vLLM's default compilation; or, with
--measure-tree, the draft's tree measurements. The work is vllm_chimera.harness.bench and
.bench_tree; this module is the command line.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
from pathlib import Path

from vllm_chimera.context_lookup import OCCURRENCES


def _bench_settings(parser: argparse.ArgumentParser, args: argparse.Namespace):
    """BenchSettings from chimera-bench's arguments; every usage error before any work."""
    if args.quick:
        args.num_prompts, args.max_tokens, args.batch_sizes = 8, 32, "1,4"
    try:
        batch_sizes = tuple(int(b) for b in args.batch_sizes.split(","))
    except ValueError:
        parser.error(f"--batch-sizes must be comma-separated integers, got {args.batch_sizes!r}")
    if min(batch_sizes) < 1:
        parser.error("--batch-sizes must be >= 1")
    if args.save_schedule and not args.draft:
        parser.error("--save-schedule needs --draft")
    if args.lookup_tokens is not None and args.lookup_tokens < 1:
        parser.error(f"--lookup-tokens must be at least 1, got {args.lookup_tokens}")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm_chimera.harness.bench import BenchSettings, parse_method

    try:
        methods = [parse_method(spec) for spec in args.methods.split(",")]
    except ValueError as error:
        parser.error(str(error))
    if args.measure_tree and not args.draft:
        parser.error("--measure-tree needs --draft")
    if any(name == "chimera-confident" for name, _ in methods) and args.min_confidence is None:
        parser.error("method chimera-confident needs --min-confidence P (a number in (0, 1))")
    from vllm_chimera.vllm.spec_config import parse_min_confidence

    try:
        parse_min_confidence(args.min_confidence)
    except ValueError as error:
        parser.error(f"--min-confidence: {error}")
    if (args.save_schedule and not args.measure_tree
            and not any(name == "chimera" and k for name, k in methods)):
        parser.error("--save-schedule needs chimera:K methods to measure, e.g. chimera:1,chimera:4 "
                     "(or --measure-tree)")
    tree = "auto"
    if args.tree != "auto":
        try:
            tree = json.loads(args.tree)
        except json.JSONDecodeError as error:
            parser.error(f"--tree must be 'auto' or a JSON list of paths such as "
                         f"'[[0], [1], [0, 0]]': {error}")
    engine_kwargs = {"kv_cache_memory_bytes": int(args.kv_cache_gib * (1 << 30))}
    if args.dtype is not None:  # (only what differs from ENGINE_DEFAULTS: saved runs stay reusable)
        engine_kwargs["dtype"] = args.dtype
    if args.eager:
        engine_kwargs["enforce_eager"] = True
    target = args.target
    if target == "smollm2":
        from vllm_chimera.prepare.targets import prepare_target

        target = str(prepare_target("smollm2"))
    return BenchSettings(
        target=target, draft=args.draft, medusa_draft=args.medusa_draft,
        eagle_draft=args.eagle_draft, methods=tuple(args.methods.split(",")),
        batch_sizes=batch_sizes, max_tokens=args.max_tokens, num_speculative_tokens=args.num_tokens,
        sampled_temperature=args.temperature or None, sampled_batch_size=args.sampled_batch_size,
        step_times=not args.no_step_times, engine_kwargs=engine_kwargs,
        lookup=lookup_settings(args), tree=tree,
        rounds=args.rounds, min_confidence=args.min_confidence, prompt_set=args.prompts)


def lookup_settings(args: argparse.Namespace) -> dict | None:
    """Chimera's lookup settings from --lookup-matcher, --lookup-tokens and
    --lookup-occurrence (None: the plugin's defaults, so that runs saved without them stay
    reusable)."""
    settings = {"matcher": getattr(args, "lookup_matcher", None),
                "num_tokens": args.lookup_tokens, "occurrence": args.lookup_occurrence}
    return {key: value for key, value in settings.items() if value is not None} or None


def _rerun(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[str, ...]:
    rerun = tuple(spec for spec in args.rerun.split(",") if spec)
    unknown = set(rerun) - set(args.methods.split(",")) - {"all"}
    if unknown:
        parser.error(f"--rerun {','.join(sorted(unknown))}: not among --methods {args.methods}")
    return rerun


def _measure_tree(parser: argparse.ArgumentParser, args: argparse.Namespace, settings) -> int:
    """chimera-bench --measure-tree (bench_tree.py), in a fresh process as every method."""
    from vllm_chimera.harness import bench_tree  # (imports vLLM)
    from vllm_chimera.prepare.datasets import heldout_prompts

    try:
        sizes = tuple(int(n) for n in args.tree_sizes.split(","))
    except ValueError:
        parser.error(f"--tree-sizes must be comma-separated integers, got {args.tree_sizes!r}")
    if min(sizes) < 2 or max(sizes) > 129:
        parser.error("--tree-sizes must be in 2..129 (the root and 1..128 drafts)")
    if not 1 <= args.tree_top_k <= 16:
        parser.error("--tree-top-k must be in 1..16")
    measure = bench_tree.TreeMeasureSettings(top_k=args.tree_top_k, tree_sizes=sizes,
                                             num_prompts=args.measure_prompts,
                                             max_tokens=args.measure_tokens)
    prompts = heldout_prompts(settings.target, measure.num_prompts)
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        report = pool.apply(bench_tree.measure_tree, (settings, measure, prompts))
    results = bench_tree.tree_results(report)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    (output / "tree-measure.json").write_text(json.dumps({**report, "results": results}, indent=2))
    (output / "tree-measure.md").write_text(bench_tree.markdown(report, results))
    bench_tree.plot(report, output / "tree-measure.png")
    print((output / "tree-measure.md").read_text())
    if args.save_schedule:
        print(f"tree settings saved in {bench_tree.save_tree_settings(results, args.draft)}")
    return 0


def bench_main(argv=None) -> int:
    """chimera-bench: plain, n-gram, Chimera (and vLLM's Medusa and EAGLE with drafts from
    chimera-train --draft-kind medusa|eagle) inside vLLM, side by side in one run."""
    parser = argparse.ArgumentParser(prog="chimera-bench", description=bench_main.__doc__)
    parser.add_argument("--target", required=True, help="target folder, or 'smollm2' (prepared)")
    parser.add_argument("--draft", help="Chimera draft folder (needed for method chimera)")
    parser.add_argument("--medusa-draft", help="Medusa heads folder (method medusa)")
    parser.add_argument("--eagle-draft", help="EAGLE-1 draft folder (method eagle)")
    parser.add_argument("--methods", default="plain,ngram,chimera",
                        help="comma-separated: plain, ngram, suffix, chimera (with the "
                             "context lookup), chimera-nolookup, chimera-suffix / chimera-ngram "
                             "(a lookup matcher named), chimera-confident (--min-confidence), "
                             "medusa, eagle; METHOD:K fixes K (chimera:2); chimera alone uses "
                             "the draft's defaults")
    parser.add_argument("--batch-sizes", default="1,4,16")
    parser.add_argument("--prompts", choices=("mtbench", "code"), default="mtbench",
                        help="MT-bench first turns, or the held-out code requests "
                             "(prepare/data/code_bench.jsonl: 24, from sources no draft trains on)")
    parser.add_argument("--num-prompts", type=int, default=80)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--num-tokens", type=int, default=None,
                        help="K of chimera/medusa/eagle (default: the draft's heads or trained steps)")
    parser.add_argument("--lookup-tokens", type=int, default=None,
                        help="tokens chimera drafts from a context-lookup match (default: the "
                             "plugin's); method chimera-nolookup turns the lookup off")
    parser.add_argument("--lookup-matcher", choices=("ngram", "suffix"), default=None,
                        help="chimera's lookup: 'suffix' (suffix trees over the request and "
                             "earlier requests, as vLLM's suffix method; the plugin's default) or "
                             "'ngram' (the request's own text)")
    parser.add_argument("--lookup-occurrence", choices=OCCURRENCES, default=None,
                        help="which earlier occurrence of the matched suffix chimera's lookup "
                             "drafts from (default: the plugin's, latest; earliest = vLLM's "
                             "n-gram matcher)")
    parser.add_argument("--temperature", type=float, default=0.7, help="the sampled setting (0: none)")
    parser.add_argument("--sampled-batch-size", type=int, default=None,
                        help="batch size of the sampled setting (default: the largest)")
    parser.add_argument("--no-step-times", action="store_true",
                        help="do not time the parts of each engine step (on GPUs the timing "
                             "synchronises the device every step)")
    parser.add_argument("--kv-cache-gib", type=float, default=1.0)
    parser.add_argument("--dtype", default=None, help="the target's (and drafts') dtype (default: "
                        "float32 on CPU, where it makes greedy outputs comparable token for "
                        "token; the model's own on GPU)")
    parser.add_argument("--eager", action="store_true",
                        help="start every engine with enforce_eager=True (default: vLLM's own "
                             "compilation, compile mode on CPU and CUDA graphs on GPU, as users "
                             "run it; eager ratios flatter an uncompiled draft: label such runs)")
    parser.add_argument("--save-schedule", action="store_true",
                        help="store the step-aside schedule measured from the chimera:K methods in "
                             "the --draft folder's measurements.json, for this device type (used by vLLM "
                             "whenever no K is given)")
    parser.add_argument("--tree", default="auto",
                        help="the tree of methods chimera-tree / chimera-tree-nolookup: 'auto' (the "
                             "draft's measured tree and schedule) or a JSON list of paths of top-k "
                             "ranks, e.g. '[[0], [1], [0, 0]]'")
    parser.add_argument("--measure-tree", action="store_true",
                        help="instead of the benchmark: measure the draft's per-head top-k accuracies, "
                             "the step time per tree size and the fastest tree per batch size on "
                             "held-out prompts (OUTPUT/tree-measure.*); with --save-schedule store "
                             "them in the draft's measurements.json (what tree 'auto' uses)")
    parser.add_argument("--tree-top-k", type=int, default=4, help="--measure-tree: ranks per head")
    parser.add_argument("--tree-sizes", default="2,3,4,6,8,12,16,32,64",
                        help="--measure-tree: tree sizes to time, in verified tokens (root + drafts)")
    parser.add_argument("--measure-prompts", type=int, default=16,
                        help="--measure-tree: held-out ShareGPT prompts (never MT-bench's)")
    parser.add_argument("--measure-tokens", type=int, default=64, help="--measure-tree: tokens per prompt")
    parser.add_argument("--quick", action="store_true", help="8 prompts, 32 tokens, batch 1 and 4")
    parser.add_argument("--rerun", default="",
                        help="comma-separated methods to run again although OUTPUT/runs/ holds a "
                             "finished run with the same settings, prompts and draft (after a code "
                             "change); 'all' for every method")
    parser.add_argument("--min-confidence", type=float, default=None,
                        help="method chimera-confident: cut each chain of head drafts where the "
                             "product of the heads' top-1 probabilities falls below this")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every method this many times, round after round, each in a fresh "
                             "process; speedups against the same round's plain run, rows = the "
                             "median round (these CPUs move 10-25%% between processes)")
    parser.add_argument("--output", default="results/bench")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    rerun = _rerun(parser, args)
    settings = _bench_settings(parser, args)
    if args.measure_tree:
        return _measure_tree(parser, args, settings)
    from vllm_chimera.harness.bench import run_benchmark, save_schedule
    from vllm_chimera.prepare.code_prompts import code_bench_prompts
    from vllm_chimera.prepare.datasets import mtbench_prompts

    load_prompts = code_bench_prompts if args.prompts == "code" else mtbench_prompts
    prompts = load_prompts(settings.target, args.num_prompts)
    report = run_benchmark(settings, prompts, Path(args.output), rerun=rerun)
    print((Path(args.output) / "bench.md").read_text())
    if args.save_schedule:
        schedule = report["step_aside_schedule"]
        print(f"step-aside schedule {schedule} saved in {save_schedule(schedule, args.draft)}")
    ok = all(row["greedy_equals_plain"] for run in report["results"].values() for row in run["greedy"])
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(bench_main())
