"""Regenerate README.md's benchmark section from a chimera-bench JSON (no figure typed by hand).

    python scripts/update_readme_results.py results/bench/smollm2/bench.json
    python scripts/update_readme_results.py results/bench/smollm2-lookup/bench.json \
        --block bench-lookup --command "METHODS=plain,ngram,chimera-nolookup,chimera \
        OUTPUT=results/bench/smollm2-lookup bash scripts/bench_smollm2.sh"

Replaces everything between the `<!-- BLOCK:begin -->` and `<!-- BLOCK:end -->` markers
(BLOCK: `bench` unless --block says otherwise).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from vllm_chimera.harness.bench import PROMPT_SETS, markdown_table

COMMAND = "bash scripts/bench_smollm2.sh"


def markers(block: str) -> tuple[str, str]:
    return f"<!-- {block}:begin -->", f"<!-- {block}:end -->"


def section(report: dict, json_path: Path, root: Path, block: str = "bench",
            command: str = COMMAND) -> str:
    begin, end = markers(block)
    env, settings = report["environment"], report["settings"]
    relative = json_path.resolve().relative_to(root)
    accelerator = env.get("accelerator") or ("none" if "+cpu" in env["torch"] else "unknown")
    device = "no GPU" if accelerator == "none" else accelerator
    return "\n".join([
        begin,
        f"Generated from `{relative}` by `scripts/update_readme_results.py`; made by "
        f"`{command}` on {env['date'][:10]}: {env['processor']} ({env['cpu_count']} cores, {device}), "
        f"torch {env['torch']}, vLLM {env['vllm']}, {env['dtype']}, {env['torch_threads']} threads. "
        f"{settings['num_prompts']} {PROMPT_SETS[settings.get('prompt_set', 'mtbench')]}, up to {settings['max_tokens']} new tokens, "
        "B concurrent requests (batch), greedy unless said otherwise; one engine per method, "
        "each in a fresh process. `= plain`: every greedy output identical to plain decoding's, "
        "token for token. Accept len: tokens per drafting step (vLLM's metric); tokens/forward: "
        "output tokens of all requests per target forward pass (compare with plain's at the "
        "same batch). Step ms: wall time per engine step (one target forward) in the "
        "target's forward / drafting / sampling and verification / everything else.",
        "",
        markdown_table(report).rstrip("\n"),
        "",
        f"![speedup and acceptance length per method and batch size]({relative.with_suffix('.png')})",
        end,
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bench_json", type=Path)
    parser.add_argument("--readme", type=Path, default=Path(__file__).resolve().parents[1] / "README.md")
    parser.add_argument("--block", default="bench", help="the README markers' name")
    parser.add_argument("--command", default=COMMAND, help="the command that made the JSON")
    args = parser.parse_args()
    report = json.loads(args.bench_json.read_text())
    text = args.readme.read_text()
    begin, end = markers(args.block)
    if begin not in text or end not in text:
        raise SystemExit(f"{args.readme} has no {begin} ... {end} block to replace")
    before, rest = text.split(begin, 1)
    after = rest.split(end, 1)[1]
    new = section(report, args.bench_json, args.readme.resolve().parent, args.block, args.command)
    args.readme.write_text(before + new + after)
    print(f"{args.readme}: {args.block} section regenerated from {args.bench_json}")


if __name__ == "__main__":
    main()
