"""Interleave prompt files into one, in a fixed pattern, for scripts/generate_responses.py.

    python scripts/mix_prompts.py --tokenizer TARGET --output mix.jsonl \
        --source code=code.jsonl --source self=self.jsonl --source sharegpt=train.jsonl \
        --pattern code,self,code,sharegpt

Each source's rows are taken in file order (the first user turn of each; a ShareGPT
conversation is cut to it), skipping rows whose chat-templated prompt is longer than
--max-prompt-tokens or that overlap MT-bench / HumanEval (prepare.prompts.Decontaminator),
and the pattern repeats until a source runs out. The mix therefore only ever grows at its
end when a source grows (more self-written prompts later): its first N rows stay the same,
so answers already written for them stay valid and generate_responses.py resumes. Ids get
the source's name in front ("sharegpt/<id>") unless they carry it; "kind" defaults to the
source's name. Writes OUTPUT.summary.json with the counts.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokenizer", required=True, help="the target's folder (its chat template)")
    p.add_argument("--output", required=True)
    p.add_argument("--source", action="append", required=True, help="NAME=conversation JSONL")
    p.add_argument("--pattern", required=True, help="comma-separated source names, repeated")
    p.add_argument("--max-prompt-tokens", type=int, default=768)
    args = p.parse_args()
    args.sources = dict(item.split("=", 1) for item in args.source)
    args.pattern = args.pattern.split(",")
    unknown = set(args.pattern) - set(args.sources)
    if unknown:
        p.error(f"--pattern names sources not given with --source: {sorted(unknown)}")
    for name, path in args.sources.items():
        if not Path(path).is_file():
            p.error(f"--source {name}: no file {path}")
    return args


def usable_rows(name: str, path: str, tokenizer, max_tokens: int, contaminated, dropped: dict):
    """The source's rows as one-user-turn conversations, in order, that fit and are clean."""
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            first = row["messages"][0]
            if first["role"] != "user":
                continue
            prompt = tokenizer.apply_chat_template([first], tokenize=False, add_generation_prompt=True)
            if len(tokenizer(prompt, add_special_tokens=False).input_ids) > max_tokens:
                dropped[f"{name}_too_long"] = dropped.get(f"{name}_too_long", 0) + 1
                continue
            if contaminated(first["content"]):
                dropped[f"{name}_benchmark"] = dropped.get(f"{name}_benchmark", 0) + 1
                continue
            row_id = str(row.get("id", ""))
            out = {"id": row_id if row_id.startswith((name, "code/")) else f"{name}/{row_id}",
                   "kind": row.get("kind", name), "messages": [first]}
            if "meta" in row:
                out["meta"] = row["meta"]
            yield out


def interleave(streams: dict, pattern: list[str]) -> tuple[list, dict, str]:
    """Rows taken from the streams in the order of pattern, repeated, until one runs out:
    (rows, rows taken from each, the stream that ran out). Prefix-stable: longer streams
    give the same rows followed by more."""
    rows, counts = [], {name: 0 for name in streams}
    while True:
        for name in pattern:
            row = next(streams[name], None)
            if row is None:
                return rows, counts, name
            rows.append(row)
            counts[name] += 1


def main():
    args = parse_args()
    from transformers import AutoTokenizer

    from vllm_chimera.prepare.cache import write_jsonl
    from vllm_chimera.prepare.prompts import Decontaminator, code_benchmark_texts

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    contaminated = Decontaminator(code_benchmark_texts()[0])
    dropped: dict = {}
    streams = {name: usable_rows(name, path, tokenizer, args.max_prompt_tokens, contaminated,
                                 dropped)
               for name, path in args.sources.items()}
    rows, counts, exhausted = interleave(streams, args.pattern)
    write_jsonl(Path(args.output), rows)
    summary = {"rows": len(rows), "by_source": counts, "pattern": args.pattern,
               "ran_out": exhausted, "max_prompt_tokens": args.max_prompt_tokens,
               "dropped": dropped, "sources": args.sources}
    Path(args.output + ".summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"{len(rows)} prompts ({counts}; {exhausted} ran out) -> {args.output}", flush=True)


if __name__ == "__main__":
    main()
