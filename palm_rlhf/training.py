"""What every training stage shares: accelerate set-up, the learning-rate schedule, checkpoints, metrics, plots."""

from __future__ import annotations

import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm import tqdm

from .palm import PaLM, PaLMConfig
from .utils import atomic_torch_save, exists, safe_torch_load, write_jsonl

CHECKPOINT_FORMAT = 1


def make_accelerator(mixed_precision: str = "no", cpu: bool = False, log_with: str | None = None,
                     project_dir: str | None = None) -> Accelerator:
    """An Accelerator that also runs real multi-process DDP on CPU (torchrun with gloo) when there is no GPU."""
    if mixed_precision not in ("no", "fp16", "bf16"):
        raise ValueError(f"mixed precision must be one of no, fp16, bf16; got {mixed_precision!r}")
    cpu = cpu or not torch.cuda.is_available()
    if cpu and mixed_precision == "fp16":
        raise ValueError("fp16 mixed precision needs a GPU; use --mixed-precision bf16 or no on CPU")
    return Accelerator(mixed_precision=mixed_precision, cpu=cpu, log_with=log_with, project_dir=project_dir)


def lr_at(step: int, *, lr: float, warmup: int, total: int, min_ratio: float = 0.1) -> float:
    """Linear warm-up to `lr`, then cosine decay to `min_ratio * lr` at `total` steps."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def step_seed(seed: int, step: int, micro: int = 0, rank: int = 0) -> int:
    return (seed * 1_000_003 + step * 10_007 + micro * 101 + rank * 7) % (2 ** 63)


def step_generator(seed: int, step: int, micro: int = 0, rank: int = 0) -> torch.Generator:
    """A generator whose draws depend only on (seed, step, micro-batch, rank): data order survives resumption."""
    return torch.Generator().manual_seed(step_seed(seed, step, micro, rank))


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


def restore(state: dict | None, model: torch.nn.Module, optimizer) -> int:
    """Load a resume state into model, optimizer and the global RNG; returns the step to start from (0: fresh)."""
    if not state:
        return 0
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])
    return state["step"]


def load_model(path, **config_overrides) -> PaLM:
    """A plain PaLM from a pretrain or SFT checkpoint (or the trunk of a reward-model checkpoint)."""
    state = load_checkpoint(path)
    config = PaLMConfig.from_dict({**state["config"], **config_overrides})
    weights = state["model"]
    if state["stage"] == "reward":
        weights = {k[len("palm."):]: v for k, v in weights.items() if k.startswith("palm.")}
    adapters = sorted({k.split(".lora_A.")[1] for k in weights if ".lora_A." in k})
    if adapters and state["stage"] != "reward":
        raise RuntimeError(f"{path} holds unmerged LoRA adapters {adapters} (a training state); load the merged "
                           f"final.pt written beside it at the end of the stage")
    weights = {k: v for k, v in weights.items() if ".lora_" not in k}
    model = PaLM(config)
    model.load_state_dict(weights, strict=True)
    return model


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


def replica_fingerprints(accelerator, model: torch.nn.Module, what: str) -> list[float]:
    """Every process's params_fingerprint; raises if the replicas drifted apart during `what`."""
    fingerprints = accelerator.gather(torch.tensor([params_fingerprint(model)], dtype=torch.float64,
                                                   device=accelerator.device)).tolist()
    if len(set(fingerprints)) > 1:
        raise RuntimeError(f"replicas disagree after {what}: parameter fingerprints {fingerprints}")
    return fingerprints


def run_training(accelerator, model, optimizer, *, args, stage: str, config: PaLMConfig, start: int, loss_fn,
                 eval_fn=None, after_step=None, extra_state=None, params=None) -> dict:
    """The loop every gradient stage shares: schedule, accumulation, clipping, eval, checkpoints, tqdm, summary.

    loss_fn(step, micro) -> (loss, {metric: float})   one micro-batch; the loop scales by 1 / grad_accum
    eval_fn(step) -> {metric: float}                   every --eval-interval steps and at the end
    after_step(step)                                   e.g. printing samples
    extra_state() -> dict                              stored in the checkpoint's "extra" (plain values only)
    """
    main = accelerator.is_main_process
    ckpt_dir = Path(args.checkpoint_dir)
    raw_model = accelerator.unwrap_model(model)
    params = params if exists(params) else [p for p in model.parameters() if p.requires_grad]
    log = MetricsLog(ckpt_dir / "metrics.jsonl" if main else None, start=start)
    end = args.steps if args.stop_after is None else min(args.steps, start + args.stop_after)
    bar = tqdm(range(start, end), initial=start, total=end, disable=not main or args.quiet, desc=stage)
    t0, losses, last_eval = time.time(), [], {}

    def checkpoint(step):
        if main:
            save_checkpoint(ckpt_dir / "last.pt", model=raw_model, optimizer=optimizer, step=step, config=config,
                            stage=stage, args=vars(args), extra={**(extra_state() if extra_state else {}),
                                                                  **last_eval})
        accelerator.wait_for_everyone()

    step = start
    try:
        for step in bar:
            lr = lr_at(step, lr=args.lr, warmup=args.warmup, total=args.steps, min_ratio=args.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            step_loss, metrics = 0.0, {}
            for micro in range(args.grad_accum):
                sync = micro == args.grad_accum - 1
                with nullcontext() if sync else accelerator.no_sync(model), accelerator.autocast():
                    loss, m = loss_fn(step, micro)
                    accelerator.backward(loss / args.grad_accum)
                step_loss += loss.item() / args.grad_accum
                for k, v in m.items():
                    metrics[k] = metrics.get(k, 0.0) + v / args.grad_accum
            if args.grad_clip > 0:
                accelerator.clip_grad_norm_(params, args.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(step_loss)
            done = step + 1
            bar.set_postfix(loss=f"{step_loss:.3f}", lr=f"{lr:.1e}", **{k: f"{v:.3f}" for k, v in metrics.items()})
            row = {"step": done, "loss": step_loss, "lr": lr, **metrics}
            if exists(eval_fn) and (done % args.eval_interval == 0 or done == end):
                last_eval = eval_fn(done)
                row.update(last_eval)
                if main:
                    shown = " | ".join(f"{k} {v:.4f}" for k, v in last_eval.items())
                    tqdm.write(f"step {done}: train loss {step_loss:.4f} | {shown}")
            if exists(after_step):
                after_step(done)
            log.write(**row)
            if done % args.checkpoint_interval == 0 or done == end:
                checkpoint(done)
            step = done
    except KeyboardInterrupt:
        if main:
            print(f"\ninterrupted at step {step}; the last checkpoint in {ckpt_dir} is intact "
                  f"(resume with --resume auto --checkpoint-dir {ckpt_dir})")
        raise
    bar.close()
    elapsed = time.time() - t0
    fingerprints = replica_fingerprints(accelerator, model, "training")
    return {"stage": stage, "steps_run": end - start, "final_step": end, "seconds": round(elapsed, 1),
            "final_train_loss": losses[-1] if losses else None, **last_eval, "losses": losses,
            "processes": accelerator.num_processes, "distributed_type": str(accelerator.distributed_type),
            "replica_fingerprints": fingerprints, "checkpoint": str(ckpt_dir / "last.pt"), "_log": log}


def finish(accelerator, summary: dict, ckpt_dir, plots: dict | None = None, lines: list[str] = ()) -> dict:
    """Write summary.json and the plot, print a readable summary (main process), close trackers."""
    log = summary.pop("_log")
    ckpt_dir = Path(ckpt_dir)
    if accelerator.is_main_process:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        (ckpt_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        plot_path = None
        if plots and log.rows:
            panels = {name: {label: log.series(key) for label, key in series.items()} for name, series in plots.items()}
            plot_path = save_plot(ckpt_dir / f"{summary['stage']}.png", panels, title=summary["stage"])
        print(f"\n=== {summary['stage']} summary ===")
        print(f"steps {summary['final_step'] - summary['steps_run']} -> {summary['final_step']} in "
              f"{summary['seconds']:.0f}s, {summary['processes']} process(es), {summary['distributed_type']}")
        for line in lines:
            print(line)
        print(f"replicas in sync: {len(set(summary['replica_fingerprints'])) == 1} "
              f"({len(summary['replica_fingerprints'])} fingerprint(s))")
        print(f"checkpoint {summary['checkpoint']}, metrics {ckpt_dir / 'metrics.jsonl'}"
              + (f", plot {plot_path}" if plot_path else ""))
    accelerator.end_training()
    return summary
