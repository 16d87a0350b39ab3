"""Where prepared targets and data live, and the file format they share; no downloading.

Everything lands in a cache directory outside the repo (`CHIMERA_CACHE_DIR`, default
~/.cache/vllm-chimera):

    <cache>/targets/<name>/          a prepared target's Hugging Face folder
    <cache>/data/sharegpt/           train.jsonl, validation.jsonl, summary.json
    <cache>/data/mtbench/            question.jsonl (benchmarks only, never trained on)
    <cache>/data/prompts/            act-as.jsonl
    <cache>/hidden/                  the trainer's hidden-state caches

Conversation format shared by the data files and the training code, one JSON object a line:
    {"id": "...", "messages": [{"role": "user" | "assistant", "content": "..."}, ...]}
"""
from __future__ import annotations

import json
import os
from pathlib import Path

CACHE_ENV = "CHIMERA_CACHE_DIR"


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """The cache root: `override`, else $CHIMERA_CACHE_DIR, else ~/.cache/vllm-chimera."""
    root = override or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "vllm-chimera"
    return Path(root).expanduser()


def target_dir(name: str, cache: str | os.PathLike | None = None) -> Path:
    """Where `chimera-prepare target NAME` puts target NAME (prepared or not)."""
    return cache_dir(cache) / "targets" / name


def sharegpt_dir(cache: str | os.PathLike | None = None) -> Path:
    """Where `chimera-prepare data` puts ShareGPT's train/validation split."""
    return cache_dir(cache) / "data" / "sharegpt"


def write_jsonl(path: Path, rows) -> None:
    """One JSON object a line, written under a temporary name and renamed (never torn)."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
