"""Mean acceptance length of several drafts inside vLLM, on the same prompts in one run.

Used for the training results (Chimera against its ablations and its peers): each draft is
run by vLLM's own speculative decoding over the MT-bench first turns, greedy, and its
outputs are checked against plain decoding's, token for token.

    python scripts/measure_acceptance.py --target smollm2 \
        --draft chimera=chimera:RUNS/smollm2-chimera-k4/draft \
        --draft no-context=chimera:RUNS/smollm2-no-context-k4/draft \
        --draft medusa=medusa:RUNS/smollm2-medusa-k4/draft \
        --output results/training/acceptance

Acceptance does not depend on the batch size (greedy drafting and verification are per
request), so the prompts are sent 16 at a time to keep the run short on a CPU. Each
engine runs in a fresh process (see vllm_chimera.harness.bench).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
from pathlib import Path


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", required=True, help="target folder, or 'smollm2' (prepared)")
    p.add_argument("--draft", action="append", required=True, metavar="NAME=METHOD:DIR",
                   help="a draft to measure (METHOD: chimera, medusa or eagle); repeatable")
    p.add_argument("--lookup", action="append", default=[], metavar="NAME=JSON",
                   help="the context lookup's settings for the Chimera draft NAME, e.g. "
                        "'mm3={\"min_match\": 3}' (default: the plugin's); repeatable")
    p.add_argument("--prompts", choices=("mtbench", "heldout"), default="mtbench",
                   help="MT-bench first turns (the benchmark's), or the held-out ShareGPT first "
                        "turns, on which settings are chosen so that MT-bench stays unseen")
    p.add_argument("--num-prompts", type=int, default=80)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--num-tokens", type=int,
                   help="K for every draft (default: each draft's own; a Chimera draft's all "
                        "heads, never its step-aside schedule, which would draft nothing at "
                        "--batch-size 16 and report 1.00)")
    p.add_argument("--kv-cache-gib", type=float, default=2.0)
    p.add_argument("--output", required=True, help="folder for acceptance.json and .md")
    args = p.parse_args()
    if args.num_tokens is not None and args.num_tokens < 1:
        p.error(f"--num-tokens must be at least 1, got {args.num_tokens}")
    drafts = []
    for entry in args.draft:
        name, sep, rest = entry.partition("=")
        method, sep2, folder = rest.partition(":")
        if not (sep and sep2 and name and folder):
            p.error(f"--draft {entry!r}: expected NAME=METHOD:DIR")
        if not Path(folder, "config.json").is_file():
            p.error(f"--draft {entry!r}: {folder} has no config.json")
        drafts.append((name, method, folder))
    lookups = {}
    for entry in args.lookup:
        name, sep, value = entry.partition("=")
        chimera_names = {d[0] for d in drafts if d[1] == "chimera"}
        if not sep or name not in chimera_names:
            p.error(f"--lookup {entry!r}: expected NAME=JSON for a --draft NAME=chimera:DIR")
        try:
            lookups[name] = json.loads(value)
        except ValueError as e:
            p.error(f"--lookup {entry!r}: {e}")
    args.lookups = lookups
    return args, drafts


def main():
    args, drafts = parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm_chimera.prepare.datasets import heldout_prompts, mtbench_prompts
    from vllm_chimera.prepare.targets import prepare_target
    from vllm_chimera.harness.bench import DRAFT_OPTIONS, BenchSettings, run_method

    target = str(prepare_target("smollm2")) if args.target == "smollm2" else args.target
    prompts = (mtbench_prompts if args.prompts == "mtbench" else heldout_prompts)(
        target, args.num_prompts)
    engine = {"kv_cache_memory_bytes": int(args.kv_cache_gib * (1 << 30))}
    runs = [("plain", "plain", None)] + drafts
    context = multiprocessing.get_context("spawn")
    rows = []
    plain_ids = None
    for name, method, folder in runs:
        settings = BenchSettings(target=target, methods=(method,), batch_sizes=(args.batch_size,),
                                 max_tokens=args.max_tokens, sampled_temperature=None,
                                 num_speculative_tokens=num_tokens(args, method, folder),
                                 engine_kwargs=engine,
                                 lookup=args.lookups.get(name),
                                 **({DRAFT_OPTIONS[method]: folder} if folder else {}))
        try:
            with context.Pool(1) as pool:
                result = pool.apply(run_method, (method, settings, prompts))
        except Exception as e:  # noqa: BLE001 (any engine failure: record it, measure the rest)
            rows.append({"name": name, "method": method, "draft": folder,
                         "error": f"{type(e).__name__}: {e}"})
            print(f"{name}: FAILED ({type(e).__name__}: {e})", flush=True)
            write_report(args, target, prompts, settings, rows)
            continue
        row = result["greedy"][0]
        ids = row.pop("token_ids")
        plain_ids = plain_ids if plain_ids is not None else ids
        row.update(name=name, method=method, draft=folder, greedy_equals_plain=ids == plain_ids,
                   mismatched_requests=[i for i, (a, b) in enumerate(zip(ids, plain_ids)) if a != b])
        rows.append(row)
        print(f"{name}: acceptance length {row['mean_acceptance_length']:.3f}, "
              f"identical to plain: {row['greedy_equals_plain']}", flush=True)
        write_report(args, target, prompts, settings, rows)  # after every draft: nothing lost


def num_tokens(args, method: str, folder: str | None) -> int | None:
    """K for one draft: --num-tokens, else a Chimera draft's number of heads. Acceptance is
    measured at --batch-size 16, where the shipped draft's step-aside schedule (applied when
    no K is given) stands aside: the run would report 1.00 for a draft that never drafted."""
    if args.num_tokens is not None or method != "chimera":
        return args.num_tokens
    from vllm_chimera.checkpoint import load_config

    return load_config(folder).num_decoding_heads


def write_report(args, target, prompts, settings, rows) -> None:
    from vllm_chimera.harness.bench import environment

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    report = {"settings": {**vars(args), "target": target, "num_prompts": len(prompts)},
              "environment": environment(settings), "results": rows}
    (out / "acceptance.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = ["| draft | method | mean acceptance length | acceptance per position | tok/s | = plain |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['name']} | {row['method']} | failed: {row['error'][:120]} | | | |")
            continue
        per_pos = " ".join(f"{r:.2f}" for r in row["acceptance_rate_per_position"]) or "-"
        lines.append(f"| {row['name']} | {row['method']} | {row['mean_acceptance_length']:.2f} | "
                     f"{per_pos} | {row['tokens_per_second']:.1f} | "
                     f"{'yes' if row['greedy_equals_plain'] else 'NO'} |")
    (out / "acceptance.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":  # vLLM engines and spawned processes need the guard
    main()
