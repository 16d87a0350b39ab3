"""Optional: replace ShareGPT's answers by the target's own greedy answers (with vLLM).

Self-distillation already takes its labels from the target; this also makes the training
INPUTS the target's own text, which is what the draft sees when it runs. The output has the
conversation format `chimera-train --train-data` reads:

    python scripts/generate_responses.py --target ~/.cache/vllm-chimera/targets/smollm2 \
        --prompts ~/.cache/vllm-chimera/data/sharegpt/train.jsonl --num-prompts 800 \
        --max-tokens 384 --output ~/.cache/vllm-chimera/data/sharegpt/train.self.jsonl

Only the first user turn of each conversation is kept (MT-bench's first turns are what the
draft is measured on). A script, not package code: the training package never imports vLLM.
"""
from __future__ import annotations

import argparse
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
    return p.parse_args()


def main():
    args = parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # halves start-up on CPU
    from vllm import LLM, SamplingParams

    llm = LLM(model=args.target, dtype="float32", max_model_len=args.max_prompt_tokens + args.max_tokens,
              kv_cache_memory_bytes=int(args.kv_cache_gib * (1 << 30)), enforce_eager=True)
    tokenizer = llm.get_tokenizer()
    chats, ids = [], []
    with open(args.prompts) as f:
        for line in f:
            row = json.loads(line)
            first = row["messages"][0]
            text = tokenizer.apply_chat_template([first], tokenize=False, add_generation_prompt=True)
            if len(tokenizer(text, add_special_tokens=False)["input_ids"]) > args.max_prompt_tokens:
                continue
            chats.append([first])
            ids.append(row.get("id", ""))
            if len(chats) == args.num_prompts:
                break
    start = time.time()
    outputs = llm.chat(chats, SamplingParams(temperature=0.0, max_tokens=args.max_tokens))
    new_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    with open(args.output, "w") as f:
        for conv_id, chat, out in zip(ids, chats, outputs):
            messages = chat + [{"role": "assistant", "content": out.outputs[0].text}]
            f.write(json.dumps({"id": conv_id, "messages": messages}, ensure_ascii=False) + "\n")
    seconds = time.time() - start
    print(f"{len(outputs)} answers, {new_tokens} new tokens in {seconds:.0f} s "
          f"({new_tokens / seconds:.0f} tokens/s) -> {args.output}")


if __name__ == "__main__":  # vLLM's engine needs the guard
    main()
