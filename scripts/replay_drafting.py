"""Replay chain drafting offline: how would other rules for choosing between the context
lookup and the heads have done, step by step, on the target's own held-out answers?

Inside vLLM (greedy, chain verification, K heads, lookup on) a step starts after the last
accepted token: the proposer drafts from the lookup where it matches, else from the heads;
the target accepts the leading drafts that equal its own greedy tokens, and the next step
starts after them and the token it sampled. This script replays exactly that walk over the
held-out answers, which are the target's greedy output: the heads' drafts at every position
come from one teacher-forced pass over the cached target outputs (chimera-train's
validation cache), the lookup's from the proposer's own ContextLookup (vLLM's matcher). So
a rule costs seconds, not a vLLM engine run, and MT-bench stays unseen.

    python scripts/replay_drafting.py --draft vllm_chimera/drafts/smollm2-chimera \\
        --output results/training/replay-drafting

Rules replayed (each a function below):
  lookup-first       the proposer's rule today: the lookup's drafts where it matches
  heads-only         the heads always (the lookup off)
  confident-heads-T  the heads also where the lookup matches, if head 0 is at least T sure
                     and disagrees with the lookup's first token
  heads-then-lookup  where the lookup has no match: head 0's token, then the lookup's
                     continuation of the context plus it, else the heads' further tokens
"""
from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--draft", required=True, help="a saved Chimera draft folder")
    p.add_argument("--target", default="smollm2", help="target folder or prepared name")
    p.add_argument("--val-data", help="held-out answers (default: the training script's, "
                                      "the target's answers to 64 ShareGPT validation prompts)")
    p.add_argument("--val-tokens", type=int, default=20000, help="as chimera-train's")
    p.add_argument("--max-tokens", type=int, default=256, help="answer tokens replayed per answer")
    p.add_argument("--max-length", type=int, default=512,
                   help="tokens per cached sequence, prompt included (chimera-train's)")
    p.add_argument("--min-match", type=int, default=None, help="the lookup's (default: plugin's)")
    p.add_argument("--max-match", type=int, default=None, help="the lookup's (default: plugin's)")
    p.add_argument("--occurrence", choices=("latest", "earliest"), default=None,
                   help="which occurrence the lookup drafts from (default: plugin's)")
    p.add_argument("--output", required=True, help="folder for replay.json")
    return p.parse_args()


def settings_for(args) -> "TrainingSettings":
    """chimera-train's settings for a validation pass over args.val_data."""
    from vllm_chimera.prepare.cache import cache_dir
    from vllm_chimera.commands.train import settings_from_args, train_parser

    parser = train_parser()
    val_data = args.val_data or str(cache_dir() / "data" / "sharegpt" / "validation.smollm2-self.jsonl")
    return settings_from_args(parser.parse_args([
        "--target", args.target, "--train-data", val_data, "--val-data", val_data,
        "--val-tokens", str(args.val_tokens), "--max-length", str(args.max_length),
        "--output-dir", args.output]),
        parser)


def main():
    args = parse_args()
    from vllm_chimera.training.replay import RULES, replay, teacher_forced_heads
    from vllm_chimera.vllm.lookup import ContextLookup
    from vllm_chimera.vllm.spec_config import LookupSettings

    settings = LookupSettings()
    if args.min_match is not None:
        settings = replace(settings, min_match=args.min_match,
                           max_match=max(args.min_match, settings.max_match))
    if args.max_match is not None:
        settings = replace(settings, max_match=args.max_match)
    if args.occurrence is not None:
        settings = replace(settings, occurrence=args.occurrence)
    matcher = ContextLookup(settings, max_model_len=1 << 16)

    def lookup(context: np.ndarray, max_tokens: int) -> np.ndarray:
        return matcher.propose(context, len(context) - 1, int(context[-1]), max_tokens)

    answers = teacher_forced_heads(settings_for(args), args.draft, args.max_tokens)
    results = {name: replay(answers, rule, lookup) for name, rule in RULES.items()}
    print(f"{len(answers)} held-out answers, lookup {settings.to_dict()}, draft {args.draft}")
    print("| rule | steps | mean acceptance length | first position |\n|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['num_steps']} | {r['mean_acceptance_length']:.3f} | {r['first_position']:.3f} |")
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "replay.json").write_text(json.dumps(
        {"draft": args.draft, "lookup": settings.to_dict(), "num_answers": len(answers),
         "max_tokens": args.max_tokens, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
