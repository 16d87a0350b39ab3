"""The training pipeline on tiny random targets: it learns, it resumes exactly, it runs on 2 processes."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from conftest import build_tiny_target
from vllm_chimera.checkpoint import load_draft
from vllm_chimera.training import TrainingSettings, train
from vllm_chimera.commands.train import train_main
from vllm_chimera.training.data import CachedData, build_cache, cache_key, tokenize_conversation
from vllm_chimera.training.loss import IGNORE, head_labels

REPO = Path(__file__).resolve().parents[1]


def build_bigram_target(folder, seed=3):
    """A tiny Llama whose greedy next token depends on the current token alone.

    Zeroing every layer's attention and MLP outputs leaves h_t = norm(E[x_t]); with an
    untied LM head, greedy(x_t) is then a fixed random map over the vocabulary. The target's
    own greedy continuations follow that map, so the label of head i at t (the target's
    prediction of x_{t+2+i}) is a learnable function of x_{t+1}: a test of learning that a
    random, chaotic target (whose labels cannot be learnt from little data) could not give.
    """
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=False,
                         initializer_range=0.3, architectures=["LlamaForCausalLM"])
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    model.save_pretrained(folder)
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    """A tiny target folder and token rows: random 4-token prompts + the target's greedy
    continuation (loss on the continuation only)."""
    root = tmp_path_factory.mktemp("tiny_training")
    target = build_bigram_target(root / "target")
    g = torch.Generator().manual_seed(0)

    def write(name, n):
        prompts = torch.randint(0, 128, (n, 4), generator=g)
        with torch.no_grad():
            ids = target.generate(prompts, attention_mask=torch.ones_like(prompts),
                                  max_new_tokens=36, min_new_tokens=36, do_sample=False,
                                  pad_token_id=0)
        path = root / f"{name}.jsonl"
        with path.open("w") as f:
            for row in ids.tolist():
                f.write(json.dumps({"input_ids": row, "loss_mask": [0] * 4 + [1] * 36}) + "\n")
        return str(path)

    return {"root": root, "target": str(root / "target"), "train": write("train", 64),
            "val": write("val", 16)}


def settings_for(setup, output_dir, **overrides) -> TrainingSettings:
    values = dict(target=setup["target"], train_data=setup["train"], val_data=setup["val"],
                  output_dir=str(output_dir), cache_dir=str(setup["root"] / "cache"),
                  num_heads=3, max_length=64, epochs=6, batch_size=8, micro_batch_size=4,
                  lr=3e-3, warmup_ratio=0.1, save_every=5, progress=False, seed=0)
    values.update(overrides)
    return TrainingSettings(**values)


def test_head_labels_align_with_offsets():
    # greedy[t] is the target's guess for x_{t+1}; head i at t must get greedy[t+1+i].
    greedy = torch.arange(10, 17)[None]  # [1, 7]
    mask = torch.ones(1, 7, dtype=torch.bool)
    mask[0, 4] = False  # x_4 is not a response token
    labels = head_labels(greedy, mask, num_heads=2)  # [2, 1, 6]
    assert labels[0, 0].tolist() == [11, 12, IGNORE, 14, 15, IGNORE]  # predicts x_2..x_6
    assert labels[1, 0].tolist() == [12, IGNORE, 14, 15, IGNORE, IGNORE]  # predicts x_3..x_6


def test_cache_roundtrip_and_resume(tiny_setup, tmp_path):
    target = build_tiny_target(tmp_path / "t", seed=3)
    seqs = [(list(range(5 + i)), [1] * (5 + i)) for i in range(5)]
    data = build_cache(target, seqs, tmp_path / "c", batch_tokens=16, progress=False)
    assert len(data) == 5 and data.num_tokens == sum(5 + i for i in range(5))
    batch = data.batch([4, 0], torch.device("cpu"))
    assert batch["tokens"].shape == (2, 9) and batch["lengths"].tolist() == [9, 5]
    with torch.no_grad():
        out = target.base_model(input_ids=torch.arange(9)[None]).last_hidden_state[0]
    torch.testing.assert_close(batch["hidden"][0], out, atol=2e-2, rtol=1e-2)  # stored as fp16
    assert CachedData.open(tmp_path / "c").hidden.dtype.name == "float16"


def test_several_caches_read_as_one(tmp_path):
    """--train-data a,b: one cache per file, read in order as one dataset."""
    from vllm_chimera.training.data import CachedDataList

    target = build_tiny_target(tmp_path / "t", seed=3)
    seqs = [(list(range(3 + i)), [1] * (3 + i)) for i in range(5)]
    whole = build_cache(target, seqs, tmp_path / "whole", progress=False)
    parts = CachedDataList([build_cache(target, seqs[:2], tmp_path / "a", progress=False),
                            build_cache(target, seqs[2:], tmp_path / "b", progress=False)])
    assert len(parts) == 5 and parts.num_tokens == whole.num_tokens
    assert parts.greedy.tolist() == np.asarray(whole.greedy).tolist()
    cpu = torch.device("cpu")
    for indices in ([4, 0], [1, 2], [3]):  # across the boundary and within each part
        got, want = parts.batch(indices, cpu), whole.batch(indices, cpu)
        for key in want:
            torch.testing.assert_close(got[key], want[key], msg=f"{key} of {indices}")


def test_training_learns_a_learnable_pattern(tiny_setup, tmp_path):
    metrics = train(settings_for(tiny_setup, tmp_path / "run", eval_every=12))
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    history = [r for r in log if "loss" in r]
    first, last = history[0], history[-1]
    assert last["loss"] < 0.3 * first["loss"]
    accuracy = metrics["validation"]["head_accuracy"]  # [K], from 0 at the start
    assert max(first["head_accuracy"]) < 0.1 and min(accuracy) > 0.7, (first, accuracy)
    assert metrics["validation"]["est_accept_length"] > 2.5
    assert any("validation" in r for r in log[:-1])  # eval_every validated mid-run
    assert metrics["finished"] and (tmp_path / "run" / "loss_curve.png").stat().st_size > 0
    draft = load_draft(tmp_path / "run" / "draft")
    assert draft.config.num_decoding_heads == 3


@pytest.mark.parametrize("overrides", [{}, {"num_encoder_layers": 2}])
def test_resume_equals_uninterrupted(tiny_setup, tmp_path, overrides):
    common = dict(epochs=2, save_every=3, draft_overrides=overrides)
    whole = train(settings_for(tiny_setup, tmp_path / "whole", **common))
    part = train(settings_for(tiny_setup, tmp_path / "part", stop_at_step=5, **common))
    assert not part["finished"] and part["steps"] == 5
    assert not (tmp_path / "part" / "draft").exists()
    resumed = train(settings_for(tiny_setup, tmp_path / "part", **common))
    assert resumed["finished"] and resumed["steps"] == whole["steps"] == 16
    a, b = load_draft(tmp_path / "whole" / "draft"), load_draft(tmp_path / "part" / "draft")
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name
    assert resumed["validation"] == whole["validation"]


def test_resume_refuses_changed_settings(tiny_setup, tmp_path):
    train(settings_for(tiny_setup, tmp_path / "run", epochs=1, stop_at_step=2))
    with pytest.raises(ValueError, match="settings changed.*lr"):
        train(settings_for(tiny_setup, tmp_path / "run", epochs=1, lr=1e-2))


@pytest.mark.parametrize("flag", ["use_trigram_encoder", "use_context_encoder"])
def test_ablations_train(tiny_setup, tmp_path, flag):
    metrics = train(settings_for(tiny_setup, tmp_path / flag, epochs=1, **{flag: False}))
    config = load_draft(tmp_path / flag / "draft").config
    assert getattr(config, flag) is False and metrics["finished"]


def test_reduced_draft_vocabulary_trains(tiny_setup, tmp_path):
    metrics = train(settings_for(tiny_setup, tmp_path / "rv", epochs=2,
                                 draft_overrides={"draft_vocab_size": 32}))
    draft = load_draft(tmp_path / "rv" / "draft")
    assert draft.config.draft_vocab_size == 32 and len(set(draft.draft_to_target_ids.tolist())) == 32
    assert metrics["validation"]["head_accuracy"][0] > 0.2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo_matches_one_process(tiny_setup, tmp_path):
    """torchrun, 2 CPU processes, gloo: the same steps as one process (DDP averages the
    two halves of each batch exactly as gradient accumulation over two micro-batches does)."""
    args = ["--target", tiny_setup["target"], "--train-data", tiny_setup["train"],
            "--val-data", tiny_setup["val"], "--cache-dir", str(tiny_setup["root"] / "cache"),
            "--num-heads", "3", "--max-length", "64", "--epochs", "1", "--batch-size", "8",
            "--micro-batch-size", "4", "--lr", "3e-3", "--device", "cpu", "--no-progress",
            "--num-threads", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
         "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
         "-m", "vllm_chimera.commands.train", *args, "--output-dir", str(tmp_path / "ddp")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert metrics["machine"]["processes"] == 2 and metrics["finished"]
    assert train_main([*args, "--output-dir", str(tmp_path / "single")]) == 0
    a, b = load_draft(tmp_path / "ddp" / "draft"), load_draft(tmp_path / "single" / "draft")
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-3, msg=name)


@pytest.mark.parametrize("argv, message", [
    (["--output-dir", "x"], "--target"),
    (["--target", "/nonexistent/folder", "--output-dir", "x"], "neither a prepared target"),
    (["--target", "{target}", "--output-dir", "x", "--train-data", "/no/such.jsonl"],
     "--train-data: no such file"),
    (["--target", "{target}", "--output-dir", "x", "--train-data", "{train}", "--val-data", "none",
      "--batch-size", "0"], "batch_size must be positive"),
    (["--target", "{target}", "--output-dir", "x", "--train-data", "{train}", "--val-data", "none",
      "--loss-on", "everything"], "invalid choice"),
])
def test_cli_errors_are_clear(tiny_setup, capsys, argv, message):
    argv = [a.format(**tiny_setup) for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        train_main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


class CharTokenizer:
    """A stand-in tokenizer: one token per character, SmolLM2's chat template layout."""

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        text = "<sys>" + "".join(f"<{m['role']}>{m['content']}</end>\n" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}


def test_tokenize_conversation_masks_assistant_turns():
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                {"role": "user", "content": "q"}, {"role": "assistant", "content": "ok!"}]
    ids, mask = tokenize_conversation(CharTokenizer(), messages, max_length=1000)
    text = "".join(map(chr, ids))
    masked = "".join(c for c, m in zip(text, mask) if m)
    assert masked == "yo</end>\nok!</end>\n"  # the replies and their end-of-turn markers
    # "<sys><user>hi</end>\n<assistant>" is 31 characters: the cut keeps "yo</".
    ids, mask = tokenize_conversation(CharTokenizer(), messages, max_length=35)
    assert len(ids) == len(mask) == 35 and mask[31:] == [1] * 4 and sum(mask) == 4


def test_evaluate_a_saved_draft(tiny_setup, tmp_path):
    metrics = train(settings_for(tiny_setup, tmp_path / "run", epochs=2))
    argv = ["--target", tiny_setup["target"], "--train-data", tiny_setup["train"],
            "--val-data", tiny_setup["val"], "--cache-dir", str(tiny_setup["root"] / "cache"),
            "--max-length", "64", "--output-dir", str(tmp_path / "eval"),
            "--evaluate", str(tmp_path / "run" / "draft")]
    assert train_main(argv) == 0
    evaluation = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert evaluation["validation"]["head_accuracy"] == metrics["validation"]["head_accuracy"]


def test_replay_keeps_the_validation_pass_drafts(tiny_setup, tmp_path):
    """The drafting replay (scripts/replay_drafting.py) reads the heads' drafts from the same
    pass as validation: head 0's hits where it has a label are validation's accuracy."""
    from vllm_chimera.training.replay import teacher_forced_heads

    metrics = train(settings_for(tiny_setup, tmp_path / "run", epochs=2))
    answers = teacher_forced_heads(settings_for(tiny_setup, tmp_path / "eval"),
                                   str(tmp_path / "run" / "draft"), max_tokens=1000)
    assert len(answers) == 16
    hits = 0
    for a in answers:  # prompt x_0..x_3, answer x_4..x_39: head i has a label at t = 2-i..37-i
        assert (a.first, a.end) == (4, 39) and sorted(a.heads) == list(range(0, 38))
        for t, (drafts, probs) in a.heads.items():
            assert drafts.shape == probs.shape == (3,) and ((probs > 0) & (probs <= 1)).all()
            hits += int(t >= 2 and drafts[0] == a.greedy[t + 1])
    assert hits / (16 * 36) == pytest.approx(metrics["validation"]["head_accuracy"][0])


def test_cache_only_fills_the_cache_a_run_then_reuses(tiny_setup, tmp_path, monkeypatch):
    """--cache-only computes the target's outputs once; a later run must not redo them."""
    from vllm_chimera.training import trainer

    cache = tmp_path / "cache"
    argv = ["--target", tiny_setup["target"], "--train-data", tiny_setup["train"],
            "--val-data", tiny_setup["val"], "--cache-dir", str(cache), "--max-length", "64",
            "--output-dir", str(tmp_path / "out"), "--cache-only", "--no-progress"]
    assert train_main(argv) == 0
    assert len(list((cache / "hidden").glob("*/meta.json"))) == 2  # train and validation
    assert not (tmp_path / "out" / "checkpoint").exists()  # no training happened
    monkeypatch.setattr(trainer, "build_cache",
                        lambda *a, **k: pytest.fail("the cache was built a second time"))
    metrics = train(settings_for(tiny_setup, tmp_path / "run", cache_dir=str(cache), epochs=1))
    assert metrics["finished"]


def test_a_second_training_file_reuses_the_first_files_cache(tiny_setup, tmp_path, monkeypatch):
    """--train-data a,b after a run on a: only b is cached; the run reads both."""
    import shutil

    from vllm_chimera.training import trainer

    cache = str(tmp_path / "cache")
    first = train(settings_for(tiny_setup, tmp_path / "one", cache_dir=cache, epochs=1))
    more = tmp_path / "more.jsonl"
    shutil.copy(tiny_setup["val"], more)
    built = []
    original = trainer.build_cache
    monkeypatch.setattr(trainer, "build_cache", lambda target, seqs, folder, *a, **k: (
        built.append(folder.name), original(target, seqs, folder, *a, **k))[1])
    both = train(settings_for(tiny_setup, tmp_path / "two", cache_dir=cache, epochs=1,
                              train_data=f"{tiny_setup['train']},{more}"))
    assert [name.split("-")[0] for name in built] == ["more"]
    assert both["train_sequences"] == first["train_sequences"] + 16


def test_init_from_starts_where_the_saved_draft_ended(tiny_setup, tmp_path):
    """--init-from: the saved draft's weights and reduced vocabulary, not fresh ones (with
    lr 0 the continued draft is the saved one, even on other data); not what was measured of it."""
    from vllm_chimera.measurements import load_measurements, save_measurements

    vocab = {"draft_vocab_size": 32}
    first = train(settings_for(tiny_setup, tmp_path / "first", epochs=2, draft_overrides=vocab))
    saved = load_draft(tmp_path / "first" / "draft")
    save_measurements(tmp_path / "first" / "draft", "cpu", step_aside_schedule=[[1, 2, 1]])
    # Other data (whose most frequent tokens differ) and no learning: the draft must not move.
    again = train(settings_for(tiny_setup, tmp_path / "again", epochs=1, lr=0.0,
                               train_data=tiny_setup["val"], batch_size=4,
                               draft_overrides=vocab, init_from=str(tmp_path / "first" / "draft")))
    continued = load_draft(tmp_path / "again" / "draft")
    for (name, x), y in zip(saved.state_dict().items(), continued.state_dict().values()):
        assert torch.equal(x, y), name
    assert again["validation"]["head_accuracy"] == first["validation"]["head_accuracy"]
    assert load_measurements(tmp_path / "again" / "draft") == {}  # measured of the other draft
    # ... and with learning it starts from there: its first step is far better than a fresh one's.
    fresh = train(settings_for(tiny_setup, tmp_path / "fresh", epochs=1, draft_overrides=vocab))
    warm = train(settings_for(tiny_setup, tmp_path / "warm", epochs=1, draft_overrides=vocab,
                              init_from=str(tmp_path / "first" / "draft")))
    first_loss = [json.loads(line)["loss"] for name in ("fresh", "warm")
                  for line in (tmp_path / name / "log.jsonl").read_text().splitlines()[:1]]
    assert first_loss[1] < 0.5 * first_loss[0], first_loss
    assert warm["validation"]["head_accuracy"][0] >= fresh["validation"]["head_accuracy"][0]


def test_init_from_refuses_another_design(tiny_setup, tmp_path):
    train(settings_for(tiny_setup, tmp_path / "first", epochs=1))
    draft = str(tmp_path / "first" / "draft")
    with pytest.raises(ValueError, match="not the draft these settings build: num_decoding_heads 3"):
        train(settings_for(tiny_setup, tmp_path / "k2", epochs=1, num_heads=2, init_from=draft))
    with pytest.raises(ValueError, match="draft_vocab_size None"):
        train(settings_for(tiny_setup, tmp_path / "rv", epochs=1, init_from=draft,
                           draft_overrides={"draft_vocab_size": 32}))
    with pytest.raises(ValueError, match="init_from is for Chimera drafts"):
        settings_for(tiny_setup, tmp_path / "m", draft_kind="medusa", init_from=draft)
    with pytest.raises(SystemExit):
        train_main(["--target", tiny_setup["target"], "--output-dir", str(tmp_path / "x"),
                    "--train-data", tiny_setup["train"], "--init-from", str(tmp_path)])


def test_widen_into_worked_example():
    """A head 4 -> 6 wide: up keeps its rows and gains fresh ones, down keeps its columns
    and gains zero ones, so the grown head computes what the saved one does."""
    from vllm_chimera.model import ResidualHead
    from vllm_chimera.training.trainer import widen_into

    torch.manual_seed(0)
    saved, grown = torch.nn.Module(), torch.nn.Module()
    saved.head, grown.head = ResidualHead(3, 4), ResidualHead(3, 6)
    torch.nn.init.normal_(saved.head.down.weight)  # (trained heads: not the zero start)
    torch.nn.init.normal_(grown.head.down.weight)
    fresh_up = grown.head.up.weight.detach().clone()  # [6, 6]
    widen_into(saved, grown)
    assert torch.equal(grown.head.up.weight[:4], saved.head.up.weight)
    assert torch.equal(grown.head.up.weight[4:], fresh_up[4:])  # the new units' inputs
    assert torch.equal(grown.head.down.weight[:, :4], saved.head.down.weight)
    assert not grown.head.down.weight[:, 4:].any()  # ... read by nothing yet
    hs = torch.randn(5, 6)
    torch.testing.assert_close(grown.head(hs), saved.head(hs), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="does not fit"):  # narrower: refused
        widen_into(grown, saved)


def test_init_from_a_narrower_draft_grows_it(tiny_setup, tmp_path):
    """--init-from with wider encoder MLP and heads: the run starts from exactly the saved
    draft's predictions (lr 0: the same validation) and with learning the new units move;
    narrower is refused. (Breaking widen_into's zero columns fails the lr-0 check.)"""
    train(settings_for(tiny_setup, tmp_path / "first", epochs=1))
    init = str(tmp_path / "first" / "draft")
    saved = load_draft(init)
    wider = {"intermediate_size": 2 * saved.config.intermediate_size,
             "head_intermediate_size": 2 * saved.config.head_intermediate_size}
    first = json.loads((tmp_path / "first" / "metrics.json").read_text())
    same = train(settings_for(tiny_setup, tmp_path / "same", epochs=1, lr=0.0, init_from=init,
                              draft_overrides=wider))
    assert same["validation"]["head_accuracy"] == first["validation"]["head_accuracy"]
    assert same["validation"]["loss"] == pytest.approx(first["validation"]["loss"], rel=1e-7)
    grown = load_draft(tmp_path / "same" / "draft")
    assert grown.config.intermediate_size == wider["intermediate_size"]
    i = saved.config.head_intermediate_size
    assert not grown.heads[0].down.weight[:, i:].any()
    moved = train(settings_for(tiny_setup, tmp_path / "moved", epochs=1, init_from=init,
                               draft_overrides=wider))
    assert load_draft(tmp_path / "moved" / "draft").heads[0].down.weight[:, i:].abs().sum() > 0
    assert moved["validation"]["loss"] < first["validation"]["loss"]
    with pytest.raises(ValueError, match="not the draft these settings build: head_intermediate_size"):
        train(settings_for(tiny_setup, tmp_path / "narrow", epochs=1, init_from=init,
                           draft_overrides={"head_intermediate_size": i // 2}))


def test_init_from_a_smaller_vocabulary_grows_it(tiny_setup, tmp_path):
    """--init-from with a larger --draft-vocab-size: the saved tokens keep their ids and rows
    (so their logits are unchanged), the new ones are the training data's most frequent
    tokens the saved vocabulary lacks, each with the target's LM-head row; with learning the
    grown draft trains and resumes mid-run; a smaller vocabulary is refused. (Taking the new
    ids without excluding the saved ones fails the uniqueness check.)"""
    from vllm_chimera.checkpoint import target_embed_and_lm_head
    from vllm_chimera.training.trainer import frequent_token_ids

    train(settings_for(tiny_setup, tmp_path / "first", epochs=1,
                       draft_overrides={"draft_vocab_size": 24}))
    init = str(tmp_path / "first" / "draft")
    saved = load_draft(init)
    more = {"draft_vocab_size": 40}
    train(settings_for(tiny_setup, tmp_path / "same", epochs=1, lr=0.0, init_from=init,
                       draft_overrides=more))
    grown = load_draft(tmp_path / "same" / "draft")
    ids = grown.draft_to_target_ids
    assert grown.config.draft_vocab_size == 40 and len(ids) == 40
    assert torch.equal(ids[:24], saved.draft_to_target_ids)
    assert len(set(ids.tolist())) == 40  # no token twice
    assert torch.equal(grown.draft_lm_head.weight[:24], saved.draft_lm_head.weight)
    target = AutoModelForCausalLM.from_pretrained(tiny_setup["target"], dtype=torch.float32)
    _, lm_head = target_embed_and_lm_head(target)
    torch.testing.assert_close(grown.draft_lm_head.weight[24:], lm_head[ids[24:]].detach(),
                               rtol=0, atol=1e-3)  # (the draft is saved in fp16)
    key = cache_key(tiny_setup["target"], tiny_setup["train"], 64, None)  # (settings_for's)
    cached = CachedData.open(tiny_setup["root"] / "cache" / "hidden" / f"train-{key}")
    ranked = frequent_token_ids(cached, 128, 128).tolist()
    expected = [t for t in ranked if t not in set(saved.draft_to_target_ids.tolist())][:16]
    assert ids[24:].tolist() == expected
    # With learning: the grown draft trains, stops mid-run and resumes with the new vocabulary.
    steps = dict(epochs=2, init_from=init, draft_overrides=more)
    train(settings_for(tiny_setup, tmp_path / "moved", stop_at_step=3, **steps))
    moved = train(settings_for(tiny_setup, tmp_path / "moved", **steps))
    whole = train(settings_for(tiny_setup, tmp_path / "whole", **steps))
    assert moved["validation"] == whole["validation"]
    assert not torch.equal(load_draft(tmp_path / "moved" / "draft").draft_lm_head.weight[24:],
                           grown.draft_lm_head.weight[24:])
    with pytest.raises(ValueError, match="not the draft these settings build: draft_vocab_size"):
        train(settings_for(tiny_setup, tmp_path / "fewer", epochs=1, init_from=init,
                           draft_overrides={"draft_vocab_size": 16}))


def test_validation_reports_the_draft_vocabulary_coverage(tiny_setup, tmp_path):
    """vocabulary_coverage: per head, the share of the validation labels the reduced draft
    vocabulary holds (recounted here from the cache), a ceiling of head_accuracy; absent
    without a reduced vocabulary."""
    metrics = train(settings_for(tiny_setup, tmp_path / "v24", epochs=1,
                                 draft_overrides={"draft_vocab_size": 24}))
    ids = set(load_draft(tmp_path / "v24" / "draft").draft_to_target_ids.tolist())
    key = cache_key(tiny_setup["target"], tiny_setup["val"], 64, 20_000)  # (val_tokens)
    val = CachedData.open(tiny_setup["root"] / "cache" / "hidden" / f"val-{key}")
    batch = val.batch(list(range(len(val))), torch.device("cpu"))
    labels = head_labels(batch["greedy"], batch["mask"].bool(), 3)  # [K, B, L-1]
    expected = [float(np.isin(row[row != IGNORE].numpy(), list(ids)).mean()) for row in labels]
    coverage = metrics["validation"]["vocabulary_coverage"]
    assert coverage == pytest.approx(expected) and min(coverage) < 1
    assert all(a <= c for a, c in zip(metrics["validation"]["head_accuracy"], coverage))
    assert len(metrics["validation"]["lookup_misses"]["vocabulary_coverage"]) == 3
    full = train(settings_for(tiny_setup, tmp_path / "full", epochs=1))
    assert "vocabulary_coverage" not in full["validation"]


def test_init_from_a_shallower_draft_deepens_it(tiny_setup, tmp_path):
    """--init-from with --encoder-layers 2 on a one-layer draft: the new layer starts as the
    identity (o_proj, down_proj zero), so the run starts from exactly the saved draft's
    predictions (lr 0: the same validation); with learning the layer moves and the run
    resumes mid-way with the deeper design; fewer layers are refused. (Leaving the new
    layer's output projections random fails the lr-0 check.)"""
    train(settings_for(tiny_setup, tmp_path / "first", epochs=1))
    init = str(tmp_path / "first" / "draft")
    first = json.loads((tmp_path / "first" / "metrics.json").read_text())
    deeper = {"num_encoder_layers": 2}
    same = train(settings_for(tiny_setup, tmp_path / "same", epochs=1, lr=0.0, init_from=init,
                              draft_overrides=deeper))
    assert same["validation"]["head_accuracy"] == first["validation"]["head_accuracy"]
    assert same["validation"]["loss"] == pytest.approx(first["validation"]["loss"], rel=1e-6)
    grown = load_draft(tmp_path / "same" / "draft")
    assert grown.config.num_encoder_layers == 2 and len(grown.extra_layers) == 1
    assert not grown.extra_layers[0].self_attn.o_proj.weight.any()
    assert grown.extra_layers[0].self_attn.q_proj.weight.any()  # fresh, ready to learn
    moved = train(settings_for(tiny_setup, tmp_path / "moved", epochs=1, init_from=init,
                               draft_overrides=deeper))
    assert load_draft(tmp_path / "moved" / "draft").extra_layers[0].mlp.down_proj.weight.abs().sum() > 0
    assert moved["validation"]["loss"] < first["validation"]["loss"]
    with pytest.raises(ValueError, match="not the draft these settings build: num_encoder_layers"):
        train(settings_for(tiny_setup, tmp_path / "back", epochs=1,
                           init_from=str(tmp_path / "moved" / "draft")))
    # A deep draft widened: every encoder layer's new MLP units start at zero (lr 0: the
    # same validation as the deep draft's own).
    deep = json.loads((tmp_path / "moved" / "metrics.json").read_text())
    wider = {**deeper, "intermediate_size": 2 * grown.config.intermediate_size}
    same_deep = train(settings_for(tiny_setup, tmp_path / "wide", epochs=1, lr=0.0,
                                   init_from=str(tmp_path / "moved" / "draft"), draft_overrides=wider))
    assert same_deep["validation"]["loss"] == pytest.approx(deep["validation"]["loss"], rel=1e-6)


def test_the_encoder_layers_flag_reaches_the_settings(tiny_setup, tmp_path):
    from vllm_chimera.commands.train import settings_from_args, train_parser

    parser = train_parser()
    argv = ["--target", tiny_setup["target"], "--output-dir", str(tmp_path),
            "--train-data", tiny_setup["train"], "--val-data", tiny_setup["val"]]
    settings = settings_from_args(parser.parse_args(argv + ["--encoder-layers", "2"]), parser)
    assert settings.draft_overrides == {"num_encoder_layers": 2}
    for bad in (["--encoder-layers", "0"], ["--encoder-layers", "2", "--draft-kind", "medusa"],
                ["--encoder-layers", "2", "--no-context-encoder"]):
        with pytest.raises((SystemExit, ValueError)):
            settings_from_args(parser.parse_args(argv + bad), parser)


def test_the_width_flags_reach_the_settings(tiny_setup, tmp_path):
    from vllm_chimera.commands.train import settings_from_args, train_parser

    parser = train_parser()
    argv = ["--target", tiny_setup["target"], "--output-dir", str(tmp_path),
            "--train-data", tiny_setup["train"], "--val-data", tiny_setup["val"]]
    settings = settings_from_args(parser.parse_args(argv + ["--head-intermediate-size", "96",
                                                            "--draft-intermediate-size", "128"]), parser)
    assert settings.draft_overrides == {"head_intermediate_size": 96, "intermediate_size": 128}
    with pytest.raises(SystemExit):
        settings_from_args(parser.parse_args(argv + ["--head-intermediate-size", "0"]), parser)
    with pytest.raises(SystemExit):  # a Chimera option: the peers refuse it
        settings_from_args(parser.parse_args(argv + ["--head-intermediate-size", "96",
                                                     "--draft-kind", "medusa"]), parser)


def test_a_token_budget_takes_several_files_in_order(tiny_setup, tmp_path):
    """train_tokens over a,b: all of a (64 sequences of 40 tokens), then b until it is spent."""
    metrics = train(settings_for(tiny_setup, tmp_path / "run", epochs=1,
                                 train_data=f"{tiny_setup['train']},{tiny_setup['val']}",
                                 train_tokens=64 * 40 + 5 * 40))
    assert metrics["train_sequences"] == 64 + 5 and metrics["train_tokens"] == 69 * 40
    only_a = train(settings_for(tiny_setup, tmp_path / "a", epochs=1, train_tokens=20 * 40,
                                train_data=f"{tiny_setup['train']},{tiny_setup['val']}"))
    assert only_a["train_sequences"] == 20  # the budget ran out within the first file


def _evaluate_fixed(hits: torch.Tensor, top1_probs: torch.Tensor | None = None) -> dict:
    """trainer.evaluate over one batch whose loss module reports these per-head hits [K, P]
    (every position labelled) and, for the confidence curve, top-1 probabilities [K, P]."""
    from vllm_chimera.training.trainer import evaluate

    num_positions = hits.shape[1]

    class Fixed(torch.nn.Module):
        def forward(self, batch):
            self.last_hits, self.last_valid = hits, torch.ones_like(hits)
            self.last_selected = torch.ones(1, num_positions, dtype=torch.bool)  # one row
            self.last_top1_probs = top1_probs
            return torch.zeros(()), torch.zeros(hits.shape[0], 5)

        def summarize(self, totals):
            return {}

    class OneBatch:
        def __len__(self):
            return 1

        def batch(self, indices, device):  # distinct tokens: the lookup never matches
            return {"tokens": torch.arange(num_positions + 1)[None],
                    "lengths": torch.tensor([num_positions + 1])}

    settings = TrainingSettings(target="t", train_data="d", output_dir="o", autocast="off")
    return evaluate(Fixed(), OneBatch(), settings, torch.device("cpu"))


def test_conditional_accuracy_is_what_a_chain_accepts_at_each_depth():
    """head_conditional_accuracy[i] = P(head i right | heads < i right), over positions where
    every head has a label; est_accept_length = 1 + the sum of their running products."""
    # 4 positions, 3 heads: hits per head (rows) at each position (columns).
    hits = torch.tensor([[1, 1, 1, 0], [1, 0, 1, 1], [0, 0, 1, 1]], dtype=torch.bool)
    result = _evaluate_fixed(hits)
    # head 0: 3 of 4; head 1: of those 3, 2 right; head 2: of those 2, 1 right.
    assert result["head_conditional_accuracy"] == [0.75, 2 / 3, 0.5]
    assert result["est_accept_length"] == 1 + (3 + 2 + 1) / 4
    # No position repeats an earlier token: the heads draft everywhere.
    assert result["lookup_misses"]["share"] == 1.0
    assert result["lookup_misses"]["est_accept_length"] == result["est_accept_length"]


def test_confidence_cut_counts_the_drafts_a_cut_chain_makes_and_keeps():
    """validation's confidence_cut: chains cut where the product of the heads' top-1
    probabilities falls below min_confidence (head 0 always drafts), accepted up to the
    leading right heads."""
    # 4 positions, 3 heads. Leading right heads per position: 2, 1, 3, 0.
    hits = torch.tensor([[1, 1, 1, 0], [1, 0, 1, 1], [0, 0, 1, 1]], dtype=torch.bool)
    # Products per position: (0.9, 0.45, 0.36), (0.2, 0.18, 0.162), (1, 1, 1), (0.6, 0.36, 0.216).
    probs = torch.tensor([[0.9, 0.2, 1.0, 0.6], [0.5, 0.9, 1.0, 0.6], [0.8, 0.9, 1.0, 0.6]])
    cut = {row["min_confidence"]: (row["drafted"], row["accepted"])
           for row in _evaluate_fixed(hits, probs)["confidence_cut"]}
    assert cut[0.02] == (12 / 4, 6 / 4)  # nothing cut: 3 drafts each, 2 + 1 + 3 + 0 accepted
    assert cut[0.3] == (9 / 4, 6 / 4)  # lengths 3, 1, 3, 2: nothing accepted is lost
    assert cut[0.5] == (6 / 4, 5 / 4)  # lengths 1, 1, 3, 1: position 0 loses its second token
