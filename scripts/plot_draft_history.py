"""Issue 14's drafts against the answers they had seen: MT-bench acceptance inside vLLM.

Reads results/training/draft-history/drafts.json (which measured draft had trained on how
many distinct target answers, and what changed) and, for each row, its result in
results/training/<acceptance>/acceptance.json; writes history.png (mean acceptance length
and first-position acceptance against answers seen, one line per lookup occurrence rule,
with issue 14's targets) and history.md (the same as a table) beside drafts.json.

    python scripts/plot_draft_history.py
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

TRAINING = Path(__file__).resolve().parent.parent / "results" / "training"
TARGET_MEAN, TARGET_FIRST = 2.2, 0.55  # issue 14's numbers to reach


def load_rows(manifest: Path) -> list[dict]:
    """The manifest's rows, each with its measured acceptance figures added."""
    rows = []
    for row in json.loads(manifest.read_text())["drafts"]:
        results = json.loads((TRAINING / row["acceptance"] / "acceptance.json").read_text())["results"]
        found = [r for r in results if r["name"] == row["name"]]
        if len(found) != 1:
            raise SystemExit(f"{row['acceptance']}: {len(found)} results named {row['name']!r}")
        result = found[0]
        if not result["greedy_equals_plain"]:
            raise SystemExit(f"{row['acceptance']}/{row['name']}: outputs differ from plain")
        rows.append({**row, "mean": result["mean_acceptance_length"],
                     "per_position": result["acceptance_rate_per_position"]})
    return rows


def write_table(rows: list[dict], path: Path) -> None:
    lines = ["| answers seen | lookup rule | what changed | MT-bench K=4 | per position | from |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        per_position = " ".join(f"{a:.3f}" for a in r["per_position"])
        lines.append(f"| {r['answers']:,} | {r['rule']} | {r['change']} | {r['mean']:.3f} | "
                     f"{per_position} | `{r['acceptance']}/` {r['name']} |")
    path.write_text("\n".join(lines) + "\n")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")  # no display here
    import matplotlib.pyplot as plt

    fig, (ax_mean, ax_first) = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, value, target, title in (
            (ax_mean, lambda r: r["mean"], TARGET_MEAN, "mean acceptance length (K=4)"),
            (ax_first, lambda r: r["per_position"][0], TARGET_FIRST, "first-position acceptance")):
        for rule, marker in (("earliest", "s"), ("latest", "o")):
            ours = [r for r in rows if r["rule"] == rule]
            ax.plot([r["answers"] for r in ours], [value(r) for r in ours], marker=marker,
                    label=f"lookup from the {rule} occurrence")
        ax.axhline(target, color="grey", linestyle="--", label=f"issue 14's target ({target})")
        ax.set(xlabel="distinct target answers trained on", title=title)
        ax.grid(alpha=0.3)
    for r in rows:  # the change, beside its point on the left panel
        ax_mean.annotate(r["change"], (r["answers"], r["mean"]), fontsize=6,
                         xytext=(4, -8), textcoords="offset points")
    ax_mean.legend(fontsize=8, loc="lower right")
    fig.suptitle("SmolLM2-135M drafts inside vLLM, 80 MT-bench first turns, greedy, 256 tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--manifest", type=Path, default=TRAINING / "draft-history" / "drafts.json")
    args = p.parse_args()
    rows = load_rows(args.manifest)
    write_table(rows, args.manifest.with_name("history.md"))
    plot(rows, args.manifest.with_name("history.png"))
    print(args.manifest.with_name("history.md").read_text())


if __name__ == "__main__":
    main()
