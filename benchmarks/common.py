"""Timing helpers shared by the benchmarks: medians of repeated runs, GPU-aware."""

from __future__ import annotations

import json
import platform
import resource
import statistics
import subprocess
import time
from pathlib import Path

import torch


def timeit(fn, *, warmup: int = 2, reps: int = 5, device: str = "cpu") -> float:
    """Median seconds per call. "cuda": triton.testing.do_bench (events, median); "cuda_loop": synchronised loop."""
    if device == "cuda":
        try:
            from triton.testing import do_bench
            return do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
        except ImportError:
            pass
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} | torch {torch.__version__}"
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads | torch {torch.__version__}"


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def print_table(title: str, header: list[str], rows: list[list]) -> None:
    def fmt(c):
        if isinstance(c, float):
            return f"{c:,.0f}" if abs(c) >= 100 else f"{c:.3g}"
        return str(c)
    cells = [header] + [[fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print(f"\n{title}")
    print("| " + " | ".join(h.ljust(w) for h, w in zip(cells[0], widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells[1:]:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |")


def save_json(path, payload: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps({"machine": machine(), "commit": commit(), **payload}, indent=1))
