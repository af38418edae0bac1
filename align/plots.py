"""Small plotting helpers (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

# how a title names a logged metric; a name not here is shown as it is
WORDS = {
    "train/loss": "training loss", "eval/loss": "held-out loss",
    "train/reward": "reward (proxy)", "eval/reward": "reward (proxy)",
    "train/task_accuracy": "training accuracy (true)", "eval/task_accuracy": "held-out accuracy (true)",
    "train/kl": "KL to the reference", "eval/kl": "KL to the reference",
    "rewards/chosen": "implicit rewards", "rewards/rejected": "implicit rewards", "rewards/margins": "margins",
}


def series_title(prefix: str, series: dict[str, tuple[list, list]], words: dict[str, str] | None = None) -> str:
    """"prefix: a, b and c", naming only the series that have points (each phrase once, in order).

    >>> series_title("grpo", {"train/reward": ([], []), "eval/task_accuracy": ([1], [0.5])})
    'grpo: held-out accuracy (true)'
    """
    words = WORDS if words is None else words
    shown = list(dict.fromkeys(words.get(name, name) for name, (xs, _) in series.items() if len(xs)))
    text = ", ".join(shown[:-1]) + " and " + shown[-1] if len(shown) > 1 else "".join(shown) or "nothing logged"
    return f"{prefix}: {text}"


def plot_curves(path: str | Path, series: dict[str, tuple[list, list]], title: str = "", xlabel: str = "step",
                ylabel: str = "value", hlines: dict[str, float] | None = None) -> Path:
    """Write a line plot of named (x, y) series to a PNG at `path`; returns the path.

    Empty series are skipped; a series with a single point is drawn as a marker. `hlines`: named
    horizontal lines (dashed), e.g. a baseline's accuracy.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    try:
        for label, (xs, ys) in series.items():
            if len(xs) == 0:
                continue
            ax.plot(list(xs), list(ys), label=label, marker="o" if len(xs) == 1 else None, linewidth=1.2)
        for label, y in (hlines or {}).items():
            ax.axhline(y, label=label, color="black", linestyle="--", linewidth=1.0)
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if any(len(xs) for xs, _ in series.values()) or hlines:
            ax.legend(loc="best", fontsize=8)
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path
