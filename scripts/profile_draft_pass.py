"""Where a Chimera proposal's time goes, part by part, inside a vLLM engine.

Wraps the proposer's steps (lookup, input setup, attention metadata, the encoder pass, the
heads, the deferred rows) with wall-clock timers, runs one engine at vLLM's defaults
(compile mode on CPU) with SmolLM2 and the shipped draft on MT-bench first turns, one
request at a time, and prints each part's median per call in milliseconds (warm-up calls
of a first, smaller run are not counted):

    .venv/bin/python scripts/profile_draft_pass.py --output results/bench/draft-pass-profile/profile.json

A median per call, unlike a mean, is not moved by the compilation inside start-up calls.
Run it on a quiet machine: every other job moves the figures.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # (timers in this process)

HERE = Path(__file__).resolve().parent.parent
PARTS = ("propose", "_lookup_matches", "set_inputs_first_pass", "_take_deferred", "_defer",
         "_prefix_ids", "build_per_group_and_layer_attn_metadata", "_combine", "_chain_drafts")


def instrument(calls: dict) -> None:
    """Time every call of the proposer's parts, the draft's forward (the encoder pass) and
    its heads into calls[name] (seconds)."""
    from vllm_chimera.vllm import proposer
    from vllm_chimera.vllm.model import ChimeraDraftForVLLM

    def timed(owner, name: str, label: str) -> None:
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            result = original(*args, **kwargs)
            calls[label].append(time.perf_counter() - start)
            return result

        setattr(owner, name, wrapper)

    for name in PARTS:
        timed(proposer.ChimeraProposer, name, name)
    timed(ChimeraDraftForVLLM, "forward", "encoder pass (draft forward)")
    timed(ChimeraDraftForVLLM, "head_top_k", "heads (head_top_k)")
    timed(proposer, "trigram_window_ids", "trigram_window_ids")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-prompts", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()

    from vllm import SamplingParams

    from vllm_chimera.harness.bench import BenchSettings, environment
    from vllm_chimera.harness.offline import run_offline
    from vllm_chimera.prepare.datasets import mtbench_prompts
    from vllm_chimera.prepare.targets import prepare_target

    calls = collections.defaultdict(list)
    instrument(calls)
    target = str(prepare_target("smollm2"))
    draft = str(HERE / "vllm_chimera" / "drafts" / "smollm2-chimera")
    prompts = mtbench_prompts(target, args.num_prompts)
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    spec = {"method": "chimera", "model": draft}
    run_offline(target, prompts[:2], params, spec, max_num_seqs=1)  # warm-up (compilation)
    calls.clear()
    run = run_offline(target, prompts, params, spec, max_num_seqs=1)
    num_tokens = sum(len(t) for t in run.token_ids)
    report = {
        "command": "python scripts/profile_draft_pass.py", "date": time.strftime("%Y-%m-%d"),
        "environment": environment(BenchSettings(target=target)),
        "num_prompts": args.num_prompts, "max_tokens": args.max_tokens,
        "tokens_per_second": num_tokens / run.generate_seconds,
        "median_ms": {name: round(1000 * statistics.median(times), 3)
                      for name, times in sorted(calls.items())},
        "num_calls": {name: len(times) for name, times in sorted(calls.items())},
    }
    print(json.dumps(report["median_ms"], indent=1))
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
