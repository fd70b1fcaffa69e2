"""Plots and tables for runs and comparisons (matplotlib, headless)."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from .checkpoint import atomic_write_bytes, atomic_write_text


def plot_curves(histories: dict[str, list[dict]], path: Path, title: str = "") -> None:
    """Train loss and test accuracy per epoch, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for name, hist in histories.items():
        ep = [r["epoch"] for r in hist]
        ax1.plot(ep, [r["train_loss"] for r in hist], marker="o", label=name)
        ax2.plot(ep, [100 * r["test_acc"] for r in hist], marker="o", label=name)
    from matplotlib.ticker import MaxNLocator

    ax1.set(xlabel="epoch", ylabel="train loss", yscale="log")
    for ax in (ax1, ax2):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax2.set(xlabel="epoch", ylabel="test accuracy (%)")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def save_figure(fig, path: Path, dpi: int = 100) -> None:
    """Render a matplotlib figure to PNG, write it atomically (never half a file), close it."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=dpi)
    finally:
        plt.close(fig)
    atomic_write_bytes(Path(path), lambda f: f.write(buf.getvalue()))


def format_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """A plain-text table; ``columns`` = [(key, header)], floats shown with 4 significant digits."""
    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    cells = [[h for _, h in columns]] + [[fmt(r.get(k, "")) for k, _ in columns] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    lines = ["  ".join(c[i].ljust(widths[i]) for i in range(len(columns))) for c in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_csv(path: Path, rows: list[dict]) -> None:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(Path(path), buf.getvalue())
