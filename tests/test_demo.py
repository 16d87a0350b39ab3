"""chimera-demo, the README's first command: it must run and report identical outputs."""
from __future__ import annotations

import pytest

from vllm_chimera.checkpoint import SHIPPED_DRAFTS
from vllm_chimera.commands.demo import demo_main


def test_toy_demo_reference_decoder(capsys):
    assert demo_main(["--toy", "--no-vllm", "--num-prompts", "2", "--max-new-tokens", "12"]) == 0
    out = capsys.readouterr().out
    assert "greedy speculative output equals plain output: yes" in out


def test_demo_without_a_draft_says_what_to_do(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        demo_main(["--draft", str(tmp_path / "missing")])
    assert e.value.code == 2 and "chimera-demo --toy" in capsys.readouterr().err


@pytest.mark.slow
def test_smollm2_demo_with_the_shipped_draft(capsys):
    """The real target (prepared on first use) and the draft shipped in the package."""
    assert (SHIPPED_DRAFTS["smollm2"] / "config.json").is_file(), "the shipped draft is missing"
    assert demo_main(["--num-prompts", "2", "--max-new-tokens", "32"]) == 0
    out = capsys.readouterr().out
    assert "answers identical to plain vLLM: yes" in out and "speedup" in out
