"""Mean training accuracy per head over ranges of steps, from a run's log.jsonl.

In an epoch over answers the draft has never seen, training accuracy is a held-out figure:
flat there means more data of that kind does not help (results/training/README.md, "The
answers it had not seen: the plateau").

    python scripts/train_accuracy_by_step.py results/training/RUN/log.jsonl \
        --ranges 0-100 300-500 500-768 768-1000 1300-1537
"""
from __future__ import annotations

import argparse
import json


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("logs", nargs="+", help="log.jsonl files of chimera-train runs")
    p.add_argument("--ranges", nargs="+", default=["0-100", "300-500", "500-768"],
                   metavar="A-B", help="step ranges, A inclusive, B exclusive")
    args = p.parse_args()
    ranges = [tuple(int(x) for x in r.split("-")) for r in args.ranges]
    for path in args.logs:
        steps = [row for row in map(json.loads, open(path)) if "validation" not in row]
        print(path)
        for start, end in ranges:
            rows = [r for r in steps if start <= r["step"] < end]
            if not rows:
                print(f"  steps {start}-{end}: no steps logged")
                continue
            mean = [sum(r["head_accuracy"][i] for r in rows) / len(rows)
                    for i in range(len(rows[0]["head_accuracy"]))]
            print(f"  steps {start}-{end} ({len(rows)} steps): head 0.. "
                  + " ".join(f"{a:.3f}" for a in mean))


if __name__ == "__main__":
    main()
