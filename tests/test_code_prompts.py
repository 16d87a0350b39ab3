"""Code prompts from offline code (prepare/code_prompts.py): parsing, injected bugs, the
held-out benchmark's separation from the training prompts, determinism, decontamination,
licence metadata. Hermetic: fake standard-library and site-packages folders in tmp_path."""
from __future__ import annotations

import ast
import random

import pytest

from vllm_chimera.prepare import code_prompts as cp
from vllm_chimera.prepare.cache import read_jsonl

FUNCTION = '''
def count_below(values, limit):
    """How many of values are below limit."""
    total = 0
    for value in values:
        if value < limit:
            total += 1
    return total
'''
CLASS = '''
class Counter:
    """Counts things."""

    def __init__(self):
        self.count = 0
        self.seen = []
        self.limit = 10

    def add(self, item):
        """Count one item, at most limit."""
        if self.count >= self.limit:
            return False
        self.seen.append(item)
        self.count += 1
        return True
'''


def _module(name: str, index: int) -> str:
    """A module of a few distinct documented functions and one class."""
    funcs = FUNCTION.replace("count_below", f"{name}_below_{index}") + \
        FUNCTION.replace("count_below", f"{name}_above_{index}").replace("<", ">")
    return funcs + CLASS.replace("Counter", f"Counter{index}") + \
        "\ndef _private(x):\n    '''Hidden.'''\n    a = 1\n    b = 2\n    return x + a + b\n"


def fake_tree(tmp_path):
    """stdlib: textwrap (held out), mymod, mypkg/ (with a tests/ folder), _private;
    site-packages: networkx (held out) and coolpkg from a distribution with licence metadata."""
    stdlib, site = tmp_path / "stdlib", tmp_path / "site"
    (stdlib / "mypkg" / "tests").mkdir(parents=True, exist_ok=True)
    (site / "coolpkg").mkdir(parents=True, exist_ok=True)
    (site / "networkx").mkdir(exist_ok=True)
    (stdlib / "textwrap.py").write_text(_module("tw", 0))
    (stdlib / "mymod.py").write_text(_module("mm", 1))
    (stdlib / "_hidden.py").write_text(_module("hid", 2))
    (stdlib / "mypkg" / "__init__.py").write_text(_module("pk", 3))
    (stdlib / "mypkg" / "tests" / "test_x.py").write_text(_module("tst", 4))
    (site / "coolpkg" / "__init__.py").write_text(_module("cool", 5) + _module("dup", 5))
    (site / "networkx" / "__init__.py").write_text(_module("nx", 6))
    dist = site / "coolpkg_dist-1.2.dist-info"
    dist.mkdir(exist_ok=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: coolpkg-dist\nVersion: 1.2\n"
                                   "License-Expression: MIT\n")
    (dist / "top_level.txt").write_text("coolpkg\n")
    (dist / "RECORD").write_text("coolpkg/__init__.py,,\n")
    return stdlib, site


def _build(tmp_path, name="code.jsonl", **kwargs):
    sources = cp.all_sources(*fake_tree(tmp_path))
    args = dict(count_tokens=len, contaminated=lambda text: False, banned_names=set(), seed=0)
    args.update(kwargs)
    summary = cp.build_code_prompts(tmp_path / name, sources, **args)
    return read_jsonl(tmp_path / name), summary, sources


def test_units_are_documented_public_and_sized(tmp_path):
    sources = {s.name: s for s in cp.all_sources(*fake_tree(tmp_path))}
    assert "_hidden" not in sources and "mypkg" in sources
    assert all("tests" not in p.parts for p in sources["mypkg"].files)
    units = cp.units_of_file(sources["mymod"], sources["mymod"].files[0])
    names = [u.name for u in units]
    assert names == ["mm_below_1", "mm_above_1", "Counter1", "Counter1.add"]  # no _private, no
    unit = units[0]                                                           # undocumented __init__
    assert unit.module == "mymod" and not unit.is_class and unit.code.startswith("def mm_below_1")
    assert unit.code.splitlines()[unit.doc_lines[0]].strip().startswith('"""How many')
    method = units[3]
    assert method.code.startswith("def add(self, item):")  # dedented


def test_injected_bug_is_one_small_change_outside_the_docstring():
    code = FUNCTION.lstrip()
    for seed in range(10):
        buggy, what = cp.inject_bug(code, (1, 1), random.Random(seed))
        assert buggy == cp.inject_bug(code, (1, 1), random.Random(seed))[0]  # seeded
        changed = [(a, b) for a, b in zip(code.splitlines(), buggy.splitlines()) if a != b]
        assert len(changed) == 1 and changed[0][0].strip() != '"""How many of values are below limit."""'
        ast.parse(buggy)
        assert what.startswith("line ") and "->" in what
    assert cp.inject_bug('def f():\n    """Doc 1 < 2."""\n    return x\n', (1, 1),
                         random.Random(0)) is None


def test_training_prompts_never_use_held_out_sources(tmp_path):
    rows, summary, _ = _build(tmp_path)
    sources = {r["meta"]["source"] for r in rows}
    assert sources == {"mymod", "mypkg", "coolpkg"}
    assert not sources & cp.HELD_OUT_SOURCES
    assert summary["records"] == len(rows) and summary["dropped"]["duplicate"] > 0
    assert {r["kind"] for r in rows} <= set(cp.FUNCTION_KINDS)
    assert all(r["messages"][0]["role"] == "user" and "```python" in r["messages"][0]["content"]
               for r in rows)
    assert len({r["id"] for r in rows}) == len(rows)


def test_bench_uses_only_held_out_sources(tmp_path):
    sources = cp.all_sources(*fake_tree(tmp_path))
    bench = cp.build_code_bench(tmp_path / "bench.jsonl", sources, len, lambda t: False, set(),
                                num_prompts=4, max_per_source=2)
    assert {r["meta"]["source"] for r in bench} == {"textwrap", "networkx"}
    assert {r["kind"] for r in bench} <= set(cp.BENCH_KINDS)
    train = cp.build_code_prompts(tmp_path / "train.jsonl", sources, len, lambda t: False, set())
    train_modules = {r["meta"]["module"] for r in read_jsonl(tmp_path / "train.jsonl")}
    assert train["records"] and not train_modules & {r["meta"]["module"] for r in bench}


def test_committed_bench_is_held_out():
    rows = cp.code_bench_records()
    assert len(rows) == 24 and len({r["id"] for r in rows}) == 24
    assert {r["meta"]["source"] for r in rows} <= cp.HELD_OUT_SOURCES
    assert [r["kind"] for r in rows[:4]] == list(cp.BENCH_KINDS)
    assert all(r["meta"]["license"] for r in rows)


def test_deterministic_and_licence_metadata(tmp_path):
    first, _, _ = _build(tmp_path, "a.jsonl")
    second, _, _ = _build(tmp_path, "b.jsonl")
    assert first == second
    cool = [r["meta"] for r in first if r["meta"]["source"] == "coolpkg"]
    assert cool and all(m["distribution"] == "coolpkg-dist" and m["version"] == "1.2"
                        and m["license"] == "MIT" and m["group"] == "package" for m in cool)
    assert all(r["meta"]["license"] == "PSF-2.0" for r in first if r["meta"]["group"] == "stdlib")


def test_benchmark_names_texts_and_length_are_dropped(tmp_path):
    rows, _, _ = _build(tmp_path, banned_names={"mm_below_1", "add"},
                        contaminated=lambda text: "cool_above_5" in text)
    names = {r["meta"]["name"] for r in rows}
    assert "mm_below_1" not in names and not any(n.endswith(".add") for n in names)
    assert "cool_above_5" not in names and "mm_above_1" in names
    short, summary, _ = _build(tmp_path, "short.jsonl", max_prompt_tokens=300)
    assert all(len(r["messages"][0]["content"]) <= 300 for r in short)
    assert summary["dropped"]["too_long"] > 0


def test_code_bench_prompts_render_with_chat_template(tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"x": 0}, "x")),
                                  unk_token="x")
    tok.chat_template = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    tok.save_pretrained(tmp_path / "tok")
    prompts = cp.code_bench_prompts(str(tmp_path / "tok"), 8)
    rows = cp.code_bench_records()
    assert len(prompts) == 8 and prompts[0] == f"<user>{rows[0]['messages'][0]['content']}<assistant>"
    assert prompts[1] == f"<user>{rows[1]['messages'][0]['content']}<assistant>"
    with pytest.raises(ValueError, match="num_prompts"):
        cp.code_bench_prompts(str(tmp_path / "tok"), 25)


def test_mix_is_prefix_stable():
    """scripts/mix_prompts.py: the pattern repeats until a source runs out, and a longer
    source only extends the mix (answers already written stay valid)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "scripts" / "mix_prompts.py"
    spec = importlib.util.spec_from_file_location("mix_prompts", path)
    mix = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mix)
    pattern = ["code", "self", "code", "sharegpt"]

    def streams(num_self):
        return {"code": iter(f"c{i}" for i in range(100)),
                "self": iter(f"s{i}" for i in range(num_self)),
                "sharegpt": iter(f"g{i}" for i in range(100))}

    short, counts, ran_out = mix.interleave(streams(2), pattern)
    assert short == ["c0", "s0", "c1", "g0", "c2", "s1", "c3", "g1", "c4"]
    assert ran_out == "self" and counts == {"code": 5, "self": 2, "sharegpt": 2}
    longer, _, _ = mix.interleave(streams(5), pattern)
    assert longer[:len(short)] == short and len(longer) > len(short)
