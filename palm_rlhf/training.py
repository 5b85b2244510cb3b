"""What every training stage shares: accelerate set-up, the learning-rate schedule, checkpoints, metrics, plots."""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator

from .palm import PaLM, PaLMConfig
from .utils import atomic_torch_save, exists, safe_torch_load

CHECKPOINT_FORMAT = 1


def make_accelerator(mixed_precision: str = "no", cpu: bool = False) -> Accelerator:
    """An Accelerator that also runs real multi-process DDP on CPU (torchrun with gloo) when there is no GPU."""
    if mixed_precision not in ("no", "fp16", "bf16"):
        raise ValueError(f"mixed precision must be one of no, fp16, bf16; got {mixed_precision!r}")
    cpu = cpu or not torch.cuda.is_available()
    if cpu and mixed_precision == "fp16":
        raise ValueError("fp16 mixed precision needs a GPU; use --mixed-precision bf16 or no on CPU")
    return Accelerator(mixed_precision=mixed_precision, cpu=cpu)


def lr_at(step: int, *, lr: float, warmup: int, total: int, min_ratio: float = 0.1) -> float:
    """Linear warm-up to `lr`, then cosine decay to `min_ratio * lr` at `total` steps."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def step_generator(seed: int, step: int, micro: int = 0, rank: int = 0) -> torch.Generator:
    """A generator whose draws depend only on (seed, step, micro-batch, rank): data order survives resumption."""
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + step * 10_007 + micro * 101 + rank * 7) % (2 ** 63))
    return g


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with decay on matrices only (not on norm gains)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))


def save_checkpoint(path, *, model, optimizer, step: int, config: PaLMConfig, stage: str, args: dict,
                    extra: dict | None = None) -> None:
    """Everything needed to resume, written atomically. Only tensors and plain Python values (safe to load)."""
    state = {
        "format": CHECKPOINT_FORMAT,
        "stage": stage,
        "step": step,
        "config": config.to_dict(),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict() if exists(optimizer) else None,
        "rng": torch.get_rng_state(),
        "args": {k: v for k, v in args.items() if isinstance(v, (int, float, str, bool, type(None)))},
        "extra": extra or {},
    }
    atomic_torch_save(state, path)


def load_checkpoint(path, stage: str | None = None) -> dict:
    state = safe_torch_load(path)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT or "model" not in state:
        raise RuntimeError(f"{path} is not a palm-rlhf checkpoint (format {CHECKPOINT_FORMAT}); "
                           f"pass a file written by train.py")
    if exists(stage) and state["stage"] != stage:
        raise RuntimeError(f"{path} is a '{state['stage']}' checkpoint, but this is the '{stage}' stage; "
                           f"use --init to start a new stage from it")
    return state


def load_model(path, **config_overrides) -> PaLM:
    """A PaLM from any stage's checkpoint (its config is stored inside)."""
    state = load_checkpoint(path)
    config = PaLMConfig.from_dict({**state["config"], **config_overrides})
    model = PaLM(config)
    missing, unexpected = model.load_state_dict(state["model"], strict=False)
    if unexpected or missing:
        base = {k: v for k, v in state["model"].items() if k in model.state_dict()}
        model.load_state_dict(base, strict=True)
    return model


@dataclass
class MetricsLog:
    """Appends one JSON object per line; also keeps the rows for the end-of-run plot and summary."""
    path: Path | None
    rows: list = field(default_factory=list)

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


def save_plot(path, panels: dict[str, dict[str, tuple[list, list]]], title: str = "") -> Path | None:
    """One subplot per panel, one line per series; returns the path, or None when matplotlib is missing."""
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
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def params_fingerprint(model: torch.nn.Module) -> float:
    """A float64 summary of all parameters that differs when any replica drifts (for DDP sync checks)."""
    total = 0.0
    for i, p in enumerate(model.parameters()):
        total += float((p.detach().double() * (1.0 + 1e-3 * i)).sum())
    return total
