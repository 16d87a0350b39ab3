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
