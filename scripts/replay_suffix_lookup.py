"""Replay the lookups offline: the n-gram lookup against the suffix lookup (its own tree,
the global cache of earlier answers, the choice rule), step by step on the target's own
held-out answers, as scripts/replay_drafting.py replays its rules.

The answers are replayed one after another as requests of one engine at batch 1: each
answer's text joins the suffix lookup's global cache when it ends (lookup.SuffixLookup.retire),
so later answers can draft from earlier ones. A step at t drafts from the context
x_0 .. x_{t+1}; the target accepts the leading drafts equal to its greedy tokens and samples
one more (vllm_chimera.training.replay). Unlike replay_drafting.py, a lookup draft may be
longer than the heads' K (up to the setting's num_tokens).

    python scripts/replay_suffix_lookup.py --draft vllm_chimera/drafts/smollm2-chimera \\
        --output results/lookup/replay
"""
from __future__ import annotations

import argparse
import json
import pickle
from pathlib import Path

import numpy as np

# name -> (lookup settings, rule): rule "lookup-first" (the lookup's draft where it gives
# one, else the heads'), "lookup-only" (no heads: vLLM's ngram / suffix methods alone),
# "heads-only", "continue" (as lookup-first, then a lookup draft shorter than K continued
# by the heads' drafts for the positions after it).
SUFFIX_FIRST = {"matcher": "suffix", "choice": "lookup-first"}  # arctic's rule: any draft
CONFIGS = {
    "heads-only": (None, "heads-only"),
    "ngram-earliest-alone (vLLM ngram, k=4)": ({"matcher": "ngram", "occurrence": "earliest"},
                                               "lookup-only"),
    "suffix-alone (vLLM suffix)": (SUFFIX_FIRST, "lookup-only"),
    "ngram-latest": ({"matcher": "ngram"}, "lookup-first"),
    "suffix-own-first": ({**SUFFIX_FIRST, "cache_tokens": 0}, "lookup-first"),
    "suffix-cache-first": (SUFFIX_FIRST, "lookup-first"),
    "suffix-own-measured": ({"matcher": "suffix", "cache_tokens": 0}, "lookup-first"),
    "suffix-cache-measured": ({"matcher": "suffix"}, "lookup-first"),
    "suffix-cache-measured-continued": ({"matcher": "suffix"}, "continue"),
}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--draft", required=True, help="a saved Chimera draft folder")
    p.add_argument("--target", default="smollm2", help="target folder or prepared name")
    p.add_argument("--val-data", help="held-out answers (default: replay_drafting.py's)")
    p.add_argument("--val-tokens", type=int, default=20000, help="as chimera-train's")
    p.add_argument("--max-tokens", type=int, default=256, help="answer tokens replayed per answer")
    p.add_argument("--max-length", type=int, default=512, help="as chimera-train's")
    p.add_argument("--answers-cache", help="a pickle of the teacher-forced answers (made if absent)")
    p.add_argument("--output", required=True, help="folder for replay.json")
    return p.parse_args()


def load_answers(args) -> list:
    if args.answers_cache and Path(args.answers_cache).exists():
        return pickle.loads(Path(args.answers_cache).read_bytes())
    from replay_drafting import settings_for  # (scripts/ is on sys.path when run as a script)

    from vllm_chimera.training.replay import teacher_forced_heads

    answers = teacher_forced_heads(settings_for(args), args.draft, args.max_tokens)
    if args.answers_cache:
        Path(args.answers_cache).write_bytes(pickle.dumps(answers))
    return answers


def replay(answers: list, lookup_settings: dict | None, rule: str) -> dict:
    """Walk every answer, in order, with one lookup for all of them (as one engine would)."""
    from vllm_chimera.vllm import lookup
    from vllm_chimera.vllm.spec_config import LookupSettings

    settings = LookupSettings.parse(lookup_settings) if lookup_settings else None
    matcher = lookup.make_lookup(settings, max_model_len=1 << 16) if settings else None
    lookup.STATS.reset()
    steps = accepted_total = drafted_total = lookup_steps = lookup_accepted = 0
    for index, a in enumerate(answers):
        t, num_accepted = a.first - 1, None
        while t + 2 <= a.end and t in a.heads:
            heads = [int(x) for x in a.heads[t][0]]  # [K]
            context = a.tokens[:t + 2].astype(np.int32)
            match = [] if matcher is None else matcher.draft(
                index, context, t + 1, int(context[-1]), settings.num_tokens, num_accepted).tolist()
            drafts = match if match and rule != "heads-only" else heads
            if rule == "lookup-only":
                drafts = match
            if rule == "continue" and match and len(match) < len(heads):
                drafts = match + heads[len(match):]
            truth = a.greedy[t + 1:a.end]  # x_{t+2} .. x_end
            n = 0
            while n < min(len(drafts), len(truth)) and drafts[n] == truth[n]:
                n += 1
            steps, accepted_total = steps + 1, accepted_total + n
            drafted_total += len(drafts)
            if match and rule != "heads-only":
                lookup_steps, lookup_accepted = lookup_steps + 1, lookup_accepted + n
            num_accepted = n if drafts else None  # (nothing drafted: nothing verified)
            t += n + 1
        if matcher is not None:
            matcher.retire(set())  # the answer ended: into the global cache
    result = {"num_steps": steps, "mean_acceptance_length": 1 + accepted_total / max(steps, 1),
              "drafted_per_step": drafted_total / max(steps, 1),
              "lookup_steps": lookup_steps, "lookup_accepted": lookup_accepted}
    if isinstance(matcher, lookup.SuffixLookup):
        result["choice"] = lookup.STATS.choice.as_dict()
        if matcher.cache.num_tokens:
            result["cache_tokens"] = matcher.cache.num_tokens
            result["cache_bytes_per_token"] = matcher.cache.tree.estimate_memory() / matcher.cache.num_tokens
    return result


def main():
    args = parse_args()
    answers = load_answers(args)
    results = {name: replay(answers, settings, rule) for name, (settings, rule) in CONFIGS.items()}
    print(f"{len(answers)} held-out answers, draft {args.draft}")
    print("| lookup | steps | mean acceptance length | drafted per step | lookup steps |\n|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['num_steps']} | {r['mean_acceptance_length']:.3f} | "
              f"{r['drafted_per_step']:.2f} | {r['lookup_steps']} |")
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "replay.json").write_text(json.dumps(
        {"draft": args.draft, "num_answers": len(answers), "max_tokens": args.max_tokens,
         "configs": {name: {"lookup": s, "rule": r} for name, (s, r) in CONFIGS.items()},
         "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
