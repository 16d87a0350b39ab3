"""scripts/plot_draft_history.py: the committed draft history resolves to measured results.

The README's history plot is only as good as its manifest: every row must name exactly one
measured result, with outputs identical to plain vLLM's, and the answer counts must only
grow along each line.
"""
import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "plot_draft_history.py"


@pytest.fixture(scope="module")
def history():
    spec = importlib.util.spec_from_file_location("plot_draft_history", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_history_resolves_and_plots(history, tmp_path):
    manifest = history.TRAINING / "draft-history" / "drafts.json"
    rows = history.load_rows(manifest)
    assert len(rows) == len(json.loads(manifest.read_text())["drafts"])
    for rule in ("earliest", "latest"):
        answers = [r["answers"] for r in rows if r["rule"] == rule]
        assert answers == sorted(answers), rule
    copy = tmp_path / "drafts.json"
    copy.write_text(manifest.read_text())
    history.write_table(rows, copy.with_name("history.md"))
    history.plot(rows, copy.with_name("history.png"))
    table = copy.with_name("history.md").read_text().splitlines()
    assert len(table) == 2 + len(rows)
    # the committed table (quoted by the READMEs) is what the script writes from the results
    assert (manifest.with_name("history.md").read_text().splitlines() == table), \
        "history.md is stale: rerun python scripts/plot_draft_history.py"
    assert copy.with_name("history.png").stat().st_size > 10_000


def test_a_row_naming_no_result_is_refused(history, tmp_path):
    manifest = tmp_path / "drafts.json"
    manifest.write_text(json.dumps({"drafts": [
        {"acceptance": "acceptance-v2", "name": "no-such-draft", "answers": 1, "rule": "latest",
         "change": "-"}]}))
    with pytest.raises(SystemExit, match="0 results named 'no-such-draft'"):
        history.load_rows(manifest)
