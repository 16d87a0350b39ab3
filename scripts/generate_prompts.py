"""Training prompts the target writes itself (Magpie, arXiv 2406.08464), with vLLM.

An instruction-tuned model given only its chat template's opening of a user turn writes a
user request, of the kinds it was tuned on. SmolLM2's tuning data spans MT-bench's kinds
(writing, role-play, reasoning, math, coding, extraction, STEM, humanities), which
ShareGPT's first turns rarely are; half the prompts start from a generic opening word of
one kind (vllm_chimera.prepare.prompts.SELF_PROMPT_OPENERS), half free; for a code model
(--openers code: Qwen2.5-Coder, scripts/qwen_data.sh) ten of sixteen open as a code request.
Sampled (temperature 0.8, one seed per prompt: reruns write the same prompts), then kept only
if finished, of a sensible length, printable and clear of MT-bench (and HumanEval with
--humaneval; prepare.clean_self_prompt), and new.

    python scripts/generate_prompts.py --target ~/.cache/vllm-chimera/targets/smollm2 \\
        --num-prompts 4096 --output ~/.cache/vllm-chimera/data/prompts/self.jsonl
    python scripts/generate_responses.py --target ... --prompts .../self.jsonl ...

The output is conversation JSONL (one user turn each, plus its "kind"), appended every
--chunk-size attempts; OUTPUT.summary.json counts the attempts made and why prompts were
dropped, and a rerun continues from there (a larger --num-prompts extends the file).
A script, not package code: the training package never imports vLLM.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", required=True, help="the target's Hugging Face folder")
    p.add_argument("--output", required=True, help="conversation JSONL to write (appended)")
    p.add_argument("--num-prompts", type=int, default=4096, help="attempts (kept ones are fewer)")
    p.add_argument("--max-tokens", type=int, default=192, help="tokens per prompt at most")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--chunk-size", type=int, default=256, help="attempts per write")
    p.add_argument("--kv-cache-gib", type=float, default=2.0)
    p.add_argument("--openers", choices=("mtbench", "code"), default="mtbench",
                   help="opening words: MT-bench's kinds (SmolLM2) or mostly code requests "
                        "(prepare.prompts.SELF_PROMPT_OPENERS_CODE, for a code model)")
    p.add_argument("--humaneval", action="store_true",
                   help="keep prompts clear of HumanEval's too, not only MT-bench's")
    p.add_argument("--eager", action="store_true",
                   help="enforce_eager (default: vLLM's compile mode, ~1.4x faster on CPU)")
    args = p.parse_args()
    if args.num_prompts <= 0 or args.max_tokens <= 0 or args.chunk_size <= 0:
        p.error("--num-prompts, --max-tokens and --chunk-size must be positive")
    return args


def repeat_key(text: str) -> str:
    """Prompts equal up to case and spacing are repeats."""
    return " ".join(text.lower().split())


def load_state(output: Path, summary_path: Path) -> tuple[dict, set[str]]:
    """The summary of the attempts so far and the texts kept (to drop repeats)."""
    summary = {"attempts": 0, "kept": 0, "dropped": 0, "repeated": 0, "by_kind": {}}
    if summary_path.is_file():
        summary.update(json.loads(summary_path.read_text()))
    seen = set()
    if output.is_file():
        with output.open() as f:
            seen = {repeat_key(json.loads(line)["messages"][0]["content"]) for line in f}
    if len(seen) != summary["kept"]:  # a kill between the two writes: trust neither
        raise SystemExit(f"{output} holds {len(seen)} prompts but {summary_path} says "
                         f"{summary['kept']}: delete both to start again")
    return summary, seen


def main():
    args = parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # halves start-up on CPU
    from vllm import LLM, SamplingParams

    from vllm_chimera.prepare.datasets import benchmark_texts
    from vllm_chimera.prepare.prompts import (Decontaminator, clean_self_prompt, code_benchmark_texts,
                                              self_prompt_opener)

    output = Path(args.output)
    summary_path = output.with_name(output.name + ".summary.json")
    summary, seen = load_state(output, summary_path)
    if summary.get("openers", "mtbench") != args.openers and summary["attempts"]:
        raise SystemExit(f"{output} was started with --openers {summary.get('openers', 'mtbench')}: "
                         f"continue with that, or write to another file")
    if summary["attempts"] >= args.num_prompts:  # nothing to do: no engine started
        print(f"{summary['attempts']} attempts made already ({summary['kept']} kept) -> {output}")
        return
    contaminated = Decontaminator(code_benchmark_texts()[0] if args.humaneval else benchmark_texts())
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.target)  # the one vLLM loads
    # The template up to the user's words, e.g. SmolLM2's "<|im_start|>system\n...<|im_end|>\n
    # <|im_start|>user\n" (its default system prompt included, as answering will see it).
    marker = "\x00USER\x00"
    opening = tokenizer.apply_chat_template([{"role": "user", "content": marker}],
                                            tokenize=False).split(marker)[0]
    # One step prefills a whole chunk: a seeded request whose prefill vLLM splits over two
    # steps crashes plain vLLM on CPU ("CPU Generator does not use offset"; the plugin's
    # CpuModelRunnerPatch rewinds such generators for Chimera engines only). The budget is
    # what a chunk's longest prompts need, no more: compile mode's warm-up runs one batch of
    # that many tokens (65,536 took many minutes for Qwen2.5-0.5B on 2 cores).
    longest = max(len(tokenizer(opening + self_prompt_opener(i, args.openers)[1],
                                add_special_tokens=False).input_ids) for i in range(64)) + 8
    llm = LLM(model=args.target, dtype="float32", max_model_len=longest + args.max_tokens,
              kv_cache_memory_bytes=int(args.kv_cache_gib * (1 << 30)), enforce_eager=args.eager,
              max_num_seqs=args.chunk_size, max_num_batched_tokens=max(2048, longest * args.chunk_size))
    output.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    while summary["attempts"] < args.num_prompts:
        first = summary["attempts"]
        indices = range(first, min(first + args.chunk_size, args.num_prompts))
        openers = [self_prompt_opener(i, args.openers) for i in indices]
        params = [SamplingParams(temperature=args.temperature, top_p=args.top_p, seed=i,
                                 max_tokens=args.max_tokens, stop=[tokenizer.eos_token])
                  for i in indices]
        outputs = llm.generate([opening + words for _, words in openers], params, use_tqdm=True)
        rows = []
        for i, (kind, words), out in zip(indices, openers, outputs):
            completion = out.outputs[0]
            text = clean_self_prompt(words + completion.text, completion.finish_reason == "stop",
                                     contaminated)
            key = None if text is None else repeat_key(text)
            if text is None or key in seen:
                summary["dropped" if text is None else "repeated"] += 1
                continue
            seen.add(key)
            rows.append({"id": f"self-{i}", "kind": kind,
                         "messages": [{"role": "user", "content": text}]})
            summary["by_kind"][kind] = summary["by_kind"].get(kind, 0) + 1
        with output.open("a") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        summary["attempts"], summary["kept"] = indices.stop, summary["kept"] + len(rows)
        summary.update(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens)
        if args.openers != "mtbench":  # (SmolLM2's summaries stay as they were)
            summary.update(openers=args.openers, humaneval=args.humaneval)
        summary_path.write_text(json.dumps(summary, indent=2) + "\n")
        print(f"{summary['attempts']}/{args.num_prompts} attempts: {summary['kept']} kept, "
              f"{summary['dropped']} dropped, {summary['repeated']} repeats "
              f"({time.time() - start:.0f} s) -> {output}", flush=True)


if __name__ == "__main__":  # vLLM's engine needs the guard
    main()
