"""Optional: replace ShareGPT's answers by the target's own greedy answers (with vLLM).

Self-distillation already takes its labels from the target; this also makes the training
INPUTS the target's own text, which is what the draft sees when it runs. The output has the
conversation format `chimera-train --train-data` reads:

    python scripts/generate_responses.py --target ~/.cache/vllm-chimera/targets/smollm2 \
        --prompts ~/.cache/vllm-chimera/data/sharegpt/train.jsonl --num-prompts 800 \
        --max-tokens 384 --output ~/.cache/vllm-chimera/data/sharegpt/train.self.jsonl

Only the first user turn of each conversation is kept (MT-bench's first turns are what the
draft is measured on). Answers are appended to the output every --chunk-size prompts, and
a rerun skips the conversations already answered there: an interrupted run resumes, and a
larger --num-prompts extends an existing file (the first N prompts that fit, in file order).
--summary keeps a JSON of answers, tokens and tokens/s per run and the output's sha256 up to
date after every chunk; --keep-fields copies fields such as "kind" and "meta" from the prompt
rows (scripts/qwen_data.sh uses both). Engines start at vLLM's default (compile mode on CPU,
about 1.4x faster than --eager there).
A script, not package code: the training package never imports vLLM.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import time


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", required=True, help="the target's Hugging Face folder")
    p.add_argument("--prompts", required=True, help="conversation JSONL (chimera-prepare data)")
    p.add_argument("--output", required=True)
    p.add_argument("--num-prompts", type=int, default=800)
    p.add_argument("--max-prompt-tokens", type=int, default=256,
                   help="skip prompts longer than this (tokens, chat template included)")
    p.add_argument("--max-tokens", type=int, default=384, help="new tokens per answer")
    p.add_argument("--kv-cache-gib", type=float, default=2.0)
    p.add_argument("--chunk-size", type=int, default=256, help="prompts per write")
    p.add_argument("--eager", action="store_true",
                   help="enforce_eager (default: vLLM's compile mode, ~1.4x faster on CPU)")
    p.add_argument("--max-num-seqs", type=int, help="requests decoded together (vLLM's default)")
    p.add_argument("--keep-fields", default="",
                   help="comma-separated fields of the prompt rows to copy (e.g. kind,meta)")
    p.add_argument("--summary", help="JSON to keep up to date after every chunk: answers, "
                                     "tokens, seconds and tokens/s per run, the output's sha256")
    p.add_argument("--skip-prompts", type=int, default=0,
                   help="skip the first N usable prompts (answered in another file already; "
                        "train on both with chimera-train --train-data first,second)")
    return p.parse_args()


def answered_ids(path: str) -> set[str]:
    """Conversation ids already in the output (a torn last line from a kill is dropped)."""
    if not os.path.exists(path):
        return set()
    ids, good = set(), []
    with open(path) as f:
        for line in f:
            try:
                ids.add(json.loads(line)["id"])
                good.append(line)
            except (ValueError, KeyError):
                break
    with open(path, "w") as f:
        f.writelines(good)
    return ids


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_summary(path: str | None, answered: int) -> dict:
    """The --summary so far, with this run's entry appended. Answers written by a run killed
    between a chunk's write and the summary's are counted as "unaccounted" (tokens unknown)."""
    summary = {"answers": 0, "answer_tokens": 0, "seconds": 0.0, "truncated": 0, "runs": []}
    if path and os.path.exists(path):
        with open(path) as f:
            summary.update(json.load(f))
    summary["unaccounted"] = max(0, answered - summary["answers"])
    summary["runs"].append({"started": time.strftime("%Y-%m-%d %H:%M:%S"), "answers": 0,
                            "answer_tokens": 0, "seconds": 0.0})
    return summary


def update_summary(path: str | None, summary: dict, outputs, seconds: float, output: str,
                   settings: dict) -> None:
    """Add one chunk's answers to the --summary and write it (never torn)."""
    if not path:
        return
    run = summary["runs"][-1]
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    for where in (summary, run):
        where["answers"] += len(outputs)
        where["answer_tokens"] += tokens
    summary["truncated"] += sum(o.outputs[0].finish_reason == "length" for o in outputs)
    summary["seconds"] += seconds - run["seconds"]
    run["seconds"] = seconds
    run["tokens_per_s"] = round(run["answer_tokens"] / max(seconds, 1e-9), 1)
    summary.update(settings, output=os.path.basename(output), sha256=sha256_of(output),
                   bytes=os.path.getsize(output), updated=time.strftime("%Y-%m-%d %H:%M:%S"))
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(summary, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def main():
    args = parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # halves start-up on CPU
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    tokenizer = AutoTokenizer.from_pretrained(args.target)  # the one vLLM's chat() uses
    keep = [field for field in args.keep_fields.split(",") if field]
    chats, ids, extras, usable = [], [], {}, 0
    with open(args.prompts) as f:
        for line_number, line in enumerate(f):
            row = json.loads(line)
            first = row["messages"][0]
            text = tokenizer.apply_chat_template([first], tokenize=False, add_generation_prompt=True)
            if len(tokenizer(text, add_special_tokens=False)["input_ids"]) > args.max_prompt_tokens:
                continue
            usable += 1
            if usable <= args.skip_prompts:
                continue
            chats.append([first])
            ids.append(row.get("id") or f"line-{line_number}")  # resuming matches on it
            extras[ids[-1]] = {field: row[field] for field in keep if field in row}
            if len(chats) == args.num_prompts:
                break
    done = answered_ids(args.output)
    todo = [(conv_id, chat) for conv_id, chat in zip(ids, chats) if conv_id not in done]
    print(f"{len(chats)} prompts: {len(chats) - len(todo)} already answered in {args.output}, "
          f"{len(todo)} to go", flush=True)
    if not todo:  # no engine started
        return
    engine_args = {"max_num_seqs": args.max_num_seqs} if args.max_num_seqs else {}
    llm = LLM(model=args.target, dtype="float32", max_model_len=args.max_prompt_tokens + args.max_tokens,
              kv_cache_memory_bytes=int(args.kv_cache_gib * (1 << 30)), enforce_eager=args.eager,
              **engine_args)
    summary = load_summary(args.summary, len(done))
    settings = {"prompts": os.path.basename(args.prompts), "max_tokens": args.max_tokens,
                "max_prompt_tokens": args.max_prompt_tokens, "greedy": True,
                "eager": args.eager, "max_num_seqs": args.max_num_seqs}
    start, new_tokens = time.time(), 0
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    for i in range(0, len(todo), args.chunk_size):
        chunk = todo[i: i + args.chunk_size]
        outputs = llm.chat([chat for _, chat in chunk], params)
        with open(args.output, "a") as f:
            for (conv_id, chat), out in zip(chunk, outputs):
                messages = chat + [{"role": "assistant", "content": out.outputs[0].text}]
                row = {"id": conv_id, **extras.get(conv_id, {}), "messages": messages}
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        new_tokens += sum(len(o.outputs[0].token_ids) for o in outputs)
        seconds = time.time() - start
        update_summary(args.summary, summary, outputs, seconds, args.output, settings)
        print(f"{i + len(chunk)}/{len(todo)} answers, {new_tokens} new tokens in {seconds:.0f} s "
              f"({new_tokens / seconds:.0f} tokens/s) -> {args.output}", flush=True)


if __name__ == "__main__":  # vLLM's engine needs the guard
    main()
