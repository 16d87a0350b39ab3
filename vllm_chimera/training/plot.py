"""The loss-curve plot (matplotlib, optional: without it the run just skips the picture)."""
from __future__ import annotations

from pathlib import Path


def plot_history(history: list[dict], path: Path) -> Path | None:
    """Training loss (raw and smoothed) and per-head accuracy against step; validation dots.

    Validation may report more heads than training (EAGLE trains its first draft step only
    and validates K): those are dots only.
    """
    try:
        import matplotlib
        matplotlib.use("Agg")  # no display here, and none needed
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no loss plot (pip install matplotlib)")
        return None
    train = [r for r in history if "loss" in r]
    val = [r for r in history if "validation" in r]
    if not train:
        return None
    steps = [r["step"] for r in train]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot(steps, [r["loss"] for r in train], alpha=0.3, label="train (per step)")
    ax_loss.plot(steps, _smooth([r["loss"] for r in train]), label="train (smoothed)")
    ax_loss.set(xlabel="step", ylabel="weighted loss", title="loss")
    ax_loss.legend()
    num_trained = len(train[-1]["head_accuracy"])
    num_heads = max([num_trained] + [len(r["validation"]["head_accuracy"]) for r in val])
    for i in range(num_heads):
        label, color = f"head {i} (x_t+{i + 2})", f"C{i}"
        if i < num_trained:
            ax_acc.plot(steps, _smooth([r["head_accuracy"][i] for r in train]), label=label,
                        color=color)
            label = None  # one legend entry per head
        if val:
            ax_acc.scatter([r["step"] for r in val],
                           [r["validation"]["head_accuracy"][i] for r in val],
                           color=color, marker="o", label=label)
    ax_acc.set(xlabel="step", ylabel="top-1 accuracy", title="per-head accuracy (dots: validation)")
    ax_acc.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _smooth(values: list[float], window: int = 20) -> list[float]:
    """Trailing mean over up to `window` points."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def validation_points(history: list[dict], x: str = "cpu_seconds") -> list[tuple[float, dict]]:
    """(x, validation figures) of a run's logged validations, in order; `x` is a clock key
    of the records ("cpu_seconds", "seconds") or "step"."""
    return [(r[x], r["validation"]) for r in history if "validation" in r and x in r]


def _interpolate(points: list[tuple[float, dict]], at: float, key: str, i: int | None):
    """A validation figure (validation[key], or its i-th entry) at x = `at`, linear between
    the two validations around it; None outside the logged range."""
    value = (lambda v: v[key]) if i is None else (lambda v: v[key][i])  # noqa: E731
    for (x0, v0), (x1, v1) in zip(points, points[1:]):
        if x0 <= at <= x1:
            w = (at - x0) / (x1 - x0) if x1 > x0 else 1.0
            return value(v0) + w * (value(v1) - value(v0))
    if points and abs(points[-1][0] - at) < 1e-9:
        return value(points[-1][1])
    return None


def validation_table(runs: dict[str, list[dict]], x: str = "cpu_seconds") -> str:
    """Markdown table of several runs' held-out accuracy: at the end of each run, and at the
    budget every run reached (the smallest final `x`, linear between validations)."""
    finals = {name: validation_points(h, x) for name, h in runs.items()}
    finals = {name: p for name, p in finals.items() if p}
    if not finals:
        return "(no validation with %s logged)" % x
    common = min(p[-1][0] for p in finals.values())
    num_heads = len(next(iter(finals.values()))[-1][1]["head_accuracy"])
    heads = " | ".join(f"head {i}" for i in range(num_heads))
    lines = [f"| variant | steps | {x} | {heads} | est. accept | {heads.replace('head', f'@{common:.0f}: head')} |",
             "|---" * (4 + 2 * num_heads) + "|"]
    for name, points in finals.items():
        end_x, end = points[-1]
        steps = max(r["step"] for r in runs[name] if "validation" in r)
        at = [_interpolate(points, common, "head_accuracy", i) for i in range(num_heads)]
        lines.append(f"| {name} | {steps} | {end_x:.0f} | "
                     + " | ".join(f"{a:.3f}" for a in end["head_accuracy"])
                     + f" | {end['est_accept_length']:.3f} | "
                     + " | ".join("n/a" if a is None else f"{a:.3f}" for a in at) + " |")
    return "\n".join(lines)


def plot_validation_curves(runs: dict[str, list[dict]], path: Path, heads=(0, 1),
                           x: str = "cpu_seconds") -> Path | None:
    """Held-out top-1 accuracy of the given heads against `x` (CPU seconds of training by
    default), one line per run, one panel per head: recipes compared per unit of budget."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return None
    fig, axes = plt.subplots(1, len(heads), figsize=(5.5 * len(heads), 4), squeeze=False)
    for ax, i in zip(axes[0], heads):
        for k, (name, history) in enumerate(runs.items()):
            points = validation_points(history, x)
            ax.plot([p[0] for p in points], [p[1]["head_accuracy"][i] for p in points],
                    marker="o", color=f"C{k}", label=name)
        ax.set(xlabel=x.replace("_", " ") + " of training", ylabel="held-out top-1 accuracy",
               title=f"head {i} (x_t+{i + 2})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
