"""What a run leaves behind for people: the per-step metrics log (JSONL), plots of its curves, the summary."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from .utils import atomic_write, atomic_write_text, exists, write_jsonl


@dataclass
class MetricsLog:
    """Appends one JSON object per line; also keeps the rows for the end-of-run plot and summary.

    `start` is the step a run resumes from: the file keeps its rows up to that step (those written after the last
    checkpoint by an interrupted run are dropped, they are about to be redone) and they are loaded, so the plot
    and the summary cover the whole run. A fresh run (start 0) starts the file afresh."""
    path: Path | None
    start: int = 0
    rows: list = field(default_factory=list)

    def __post_init__(self):
        if not exists(self.path):
            return
        self.path = Path(self.path)
        if self.start and self.path.is_file():
            self.rows = [r for r in read_jsonl_rows(self.path) if r.get("step", 0) <= self.start]
        write_jsonl(self.rows, self.path)

    def write(self, **row) -> None:
        row = {"time": round(time.time(), 3), **row}
        self.rows.append(row)
        if exists(self.path):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")

    def series(self, key: str) -> tuple[list, list]:
        pts = [(r["step"], r[key]) for r in self.rows if key in r and "step" in r]
        return [p[0] for p in pts], [p[1] for p in pts]


def read_jsonl_rows(path) -> list[dict]:
    """The rows of a metrics file; a torn last line (a crash mid-write) is skipped."""
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def save_plot(path, panels: dict[str, dict[str, tuple[list, list]]], title: str = "",
              xlabel: str | dict[str, str] = "step") -> Path | None:
    """One subplot per panel, one line per series (panels with no data are left out); returns the path, or None
    when matplotlib is missing or nothing has data. xlabel: one for all panels, or one per panel title."""
    panels = {name: lines for name, lines in panels.items() if any(xs for xs, _ in lines.values())}
    if not panels:
        return None
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed; skipping the plot (pip install matplotlib)")
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, (name, lines) in zip(axes[0], panels.items()):
        for label, (xs, ys) in lines.items():
            if xs:
                ax.plot(xs, ys, label=label, marker="o" if len(xs) < 30 else None, markersize=3)
        ax.set_title(name)
        ax.set_xlabel(xlabel.get(name, "step") if isinstance(xlabel, dict) else xlabel)
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, dpi=110, format="png"))
    plt.close(fig)
    return Path(path)


def write_summary(path, summary: dict) -> None:
    """summary.json (or eval.json): the run's end state, atomically; private keys (_name) are left out."""
    atomic_write_text(json.dumps({k: v for k, v in summary.items() if not k.startswith("_")}, indent=1), path)
