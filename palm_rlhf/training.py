"""The loop every training stage shares: accelerate set-up, the learning-rate schedule, resume, checkpoints, a guard
against non-finite updates, metrics and the end-of-run summary.

A stage subclasses `Trainer` and defines `training_step(step) -> metrics` (PPO: one rollout + learning), or
`GradientTrainer` and defines `loss(step, micro) -> (loss, metrics)` for one micro-batch (pretraining, SFT, reward).
`trainer.train(resume=None | "auto" | path)` runs `config.steps` steps and returns the summary.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from tqdm import tqdm

from .checkpoint import (has_names, indexed_optimizer_state, named_optimizer_state, read_training_state,
                         save_training_state)
from .config import RunConfig, TrainConfig
from .fsdp import full_optimizer_state, is_sharded, load_full_optimizer_state, shard
from .metrics import MetricsLog, save_plot, write_summary
from .utils import exists, remove_stale_temp_files

MAX_BAD_IN_A_ROW = 10  # on_nonfinite="skip" gives up after this many non-finite batches in a row


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


def make_optimizer(params: list, *, lr: float, weight_decay: float, betas: tuple[float, float]) -> torch.optim.AdamW:
    """AdamW with decay on matrices only (not on norm gains or biases)."""
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas)


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


def resume_path(resume: str | Path | None, checkpoint_dir: str | Path) -> Path | None:
    """The checkpoint to resume from: None, "auto" (CHECKPOINT_DIR/last.pt when it exists) or a path."""
    if resume is None:
        return None
    if resume == "auto":
        last = Path(checkpoint_dir) / "last.pt"
        return last if last.is_file() else None
    path = Path(resume)
    if not path.is_file():
        raise FileNotFoundError(f"cannot resume from {path}: no such checkpoint file (use 'auto' to continue from "
                                f"{Path(checkpoint_dir) / 'last.pt'} when it exists)")
    return path


class NonFiniteError(RuntimeError):
    """Training produced a non-finite loss or gradient; nothing was updated or saved after it."""


class NonFiniteGuard:
    """Checks each update before it is applied. A non-finite loss or gradient norm raises NonFiniteError ("stop"),
    or skips that batch ("skip", which gives up after MAX_BAD_IN_A_ROW in a row). Every process decides alike."""

    def __init__(self, policy: str, accelerator):
        self.policy, self.accelerator = policy, accelerator
        self.in_a_row = self.skipped = 0

    def ok(self, loss: float, grad_norm, what: str, note: str) -> bool:
        """True: apply the update. what: "<stage> step N" for messages; note: which checkpoint is intact."""
        bad = not math.isfinite(loss) or (exists(grad_norm) and not math.isfinite(float(grad_norm)))
        if self.accelerator.num_processes > 1:
            flag = torch.tensor([float(bad)], device=self.accelerator.device)
            bad = self.accelerator.reduce(flag, reduction="sum").item() > 0
        if not bad:
            self.in_a_row = 0
            return True
        self.in_a_row += 1
        self.skipped += 1
        what = f"{what}: loss {loss}, gradient norm {float(grad_norm) if exists(grad_norm) else '-'}"
        if self.policy == "skip" and self.in_a_row < MAX_BAD_IN_A_ROW:
            if self.accelerator.is_main_process:
                tqdm.write(f"{what}: not finite, batch skipped (nothing updated)")
            return False
        in_a_row = f" ({self.in_a_row} batches in a row)" if self.policy == "skip" else ""
        raise NonFiniteError(
            f"{what}: not finite{in_a_row}, training diverged. Stopped before the update: nothing was changed or "
            f"saved, {note}. Lower the learning rate (--lr), keep gradient clipping on (--max-grad-norm), or pass "
            f"--on-nonfinite skip to skip such batches.")


def clip_gradients(accelerator, params: list, max_norm: float):
    """Clip to max_norm (0: no clipping) and return the global gradient norm, or None where it is unknown (fp16
    loss scaling, whose scaler skips overflowing steps by itself)."""
    if max_norm > 0 and is_sharded(params):   # DTensor gradients: torch's clip gathers the norm
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    if max_norm > 0:
        norm = accelerator.clip_grad_norm_(params, max_norm)
        return None if accelerator.scaler is not None else norm
    if accelerator.scaler is not None:
        return None
    return torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])


class Trainer:
    """Runs `config.steps` steps of `training_step` with resume, checkpoints, metrics, progress and a summary."""
    stage = "run"
    summary_file = "summary.json"
    plots: dict = {}                     # panel title -> {line label: metric key}, drawn at the end
    progress_keys: tuple = ("loss",)     # metrics shown beside the progress bar
    summary_excludes: tuple = ("history",)  # left out of the summary file (metrics.jsonl has the rows)

    def __init__(self, model, config: RunConfig, *, accelerator: Accelerator | None = None,
                 metadata: dict | None = None):
        self.config = config
        self.accelerator = accelerator if exists(accelerator) else make_accelerator(
            config.mixed_precision, config.cpu, config.log_with, config.checkpoint_dir)
        self.raw_model, self.model, self.optimizer, self.params = model, model, None, []
        self.sharded = False                     # FSDP: see prepare and palm_rlhf/fsdp.py
        self.metadata = dict(metadata or {})     # provenance stored in checkpoints (e.g. the CLI's input paths)
        self.global_step, self.saved_step = 0, None
        self.stopped: str | None = None          # why the run ended before config.steps (a stage's own rule)
        self.guard = NonFiniteGuard(config.on_nonfinite, self.accelerator)
        self.last_eval: dict = {}
        self.log: MetricsLog | None = None

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.config.checkpoint_dir)

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def prepare(self, model, params: list) -> None:
        """Train exactly `params` (everything else reachable from `model` is frozen: e.g. another wrapper's adapter
        on a shared base), build the optimizer over them and hand model and optimizer to accelerate."""
        if not params:
            raise ValueError(f"{type(model).__name__} has no trainable parameters: every weight is frozen")
        train = {id(p) for p in params}
        for p in model.parameters():
            p.requires_grad_(id(p) in train)
        cfg, acc = self.config, self.accelerator
        self.sharded = cfg.fsdp or acc.distributed_type == DistributedType.FSDP
        if self.sharded:   # sharded by PyTorch FSDP2 in place (new parameter objects), not wrapped by accelerate
            if acc.scaler is not None:
                raise ValueError("fp16 loss scaling does not handle sharded gradients: use --mixed-precision bf16 "
                                 "(or no) with --fsdp")
            names = [n for n, p in model.named_parameters() if id(p) in train]
            shard(model.to(acc.device))
            by_name = dict(model.named_parameters())
            params = [by_name[n] for n in names]
            self.model, self.optimizer = model, make_optimizer(params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                                               betas=cfg.betas)
        else:
            optimizer = make_optimizer(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=cfg.betas)
            self.model, self.optimizer = acc.prepare(model, optimizer)
        self.params = params
        ids = {id(p): n for n, p in self.raw_model.named_parameters()}
        self.param_names = [ids[id(p)] for g in self.optimizer.param_groups for p in g["params"]]

    # ------------------------------------------------------------------------------------------ what stages define

    def training_step(self, step: int) -> dict:
        raise NotImplementedError

    def should_evaluate(self, done: int, end: int) -> bool:
        return False

    def evaluate(self) -> dict:
        return {}

    def after_step(self, done: int, end: int) -> None:
        pass

    def on_train_begin(self, start: int, end: int, resumed: bool) -> None:
        pass

    def on_train_end(self, summary: dict) -> None:
        pass

    def summary_lines(self, summary: dict) -> list[str]:
        return []

    def final_model(self):
        """What a finished run exports to CHECKPOINT_DIR/model (safetensors + config.json)."""
        return self.raw_model

    def trainer_state(self) -> dict:
        return {}

    def load_trainer_state(self, state: dict) -> None:
        pass

    # ------------------------------------------------------------------------------------------ the loop

    def train(self, resume: str | Path | None = None) -> dict:
        """Train to `config.steps` (or `stop_after` more), resuming from `resume` ("auto": last.pt if there)."""
        cfg = self.config
        if self.is_main:
            for p in remove_stale_temp_files(self.checkpoint_dir):
                print(f"removed {p}, a temporary file left by an interrupted save")
        path = resume_path(resume, self.checkpoint_dir)
        if exists(path):
            self.restore(path)
        start = self.global_step
        end = cfg.steps if cfg.stop_after is None else min(cfg.steps, start + cfg.stop_after)
        if start >= end or self.stopped:
            return self.nothing_to_do(start)
        self.log = MetricsLog(self.checkpoint_dir / "metrics.jsonl" if self.is_main else None, start=start)
        if cfg.log_with:
            self.accelerator.init_trackers(f"palm-rlhf-{self.stage}", config={
                k: v for k, v in asdict(cfg).items() if isinstance(v, (int, float, str, bool))})
        self.on_train_begin(start, end, resumed=exists(path))
        self.model.train()  # dropout on (a loaded model comes in eval mode); RL stages' policies have none
        bar = tqdm(total=end, initial=start, desc=self.stage, disable=not self.is_main or cfg.quiet)
        t0 = time.perf_counter()
        try:
            for step in range(start, end):
                self.run_step(step, end, bar)
                if self.stopped:
                    end = self.global_step
                    break
        except KeyboardInterrupt:
            bar.close()
            if self.is_main:
                print(f"\n{self.stage}: interrupted at step {self.global_step}; {self.checkpoint_note()}")
            raise
        bar.close()
        summary = self.summarise(start, end, time.perf_counter() - t0)
        self.on_train_end(summary)
        if self.stopped:
            summary["stopped"] = self.stopped
        finished = end == cfg.steps or self.stopped
        if finished and self.is_main:  # the model as the ecosystem shares it
            summary["model"] = str(self.final_model().save(self.checkpoint_dir / "model"))
        elif finished and self.sharded:
            self.raw_model.weights()  # the other processes' part of gathering the weights final_model() reads
        self.finish(summary)
        return summary

    def run_step(self, step: int, end: int, bar) -> None:
        row = self.training_step(step)
        done = self.global_step = step + 1
        if self.should_evaluate(done, end):
            self.last_eval = self.evaluate()
            row.update(self.last_eval)
            if self.is_main:
                tqdm.write(f"step {done}: " + " | ".join(f"{k} {v:.4f}" for k, v in self.last_eval.items()))
        self.after_step(done, end)
        self.log.write(step=done, **row)
        if self.config.log_with:
            self.accelerator.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=done)
        bar.update(1)
        bar.set_postfix({k: f"{row[k]:.4g}" for k in self.progress_keys if k in row})
        if done % self.config.checkpoint_interval == 0 or done == end or self.stopped:
            self.save_checkpoint()

    def summarise(self, start: int, end: int, seconds: float) -> dict:
        acc = self.accelerator
        rows = [r for r in self.log.rows if r.get("step", 0) > start]
        losses = [r["loss"] for r in rows if "loss" in r]
        return {"stage": self.stage, "steps_run": end - start, "final_step": end, "seconds": round(seconds, 1),
                **({"final_train_loss": losses[-1]} if losses else {}), **self.last_eval, "losses": losses,
                "skipped_steps": self.guard.skipped, "processes": acc.num_processes,
                "distributed_type": str(acc.distributed_type),
                "replica_fingerprints": [] if self.sharded else replica_fingerprints(acc, self.model, "training"),
                "sharded": self.sharded,
                "checkpoint": str(self.checkpoint_dir / "last.pt"), "history": rows, "_seconds": seconds}

    def finish(self, summary: dict) -> None:
        """Write the summary file and the plot, print a readable summary (main process), close trackers."""
        ckpt = self.checkpoint_dir
        if self.is_main:
            write_summary(ckpt / self.summary_file, {k: v for k, v in summary.items()
                                                     if k not in self.summary_excludes})
            plot = self.plot(ckpt / f"{self.stage}.png")
            print(f"\n=== {self.stage} summary ===")
            print(f"steps {summary['final_step'] - summary['steps_run']} -> {summary['final_step']} in "
                  f"{summary['seconds']:.0f}s, {summary['processes']} process(es), {summary['distributed_type']}"
                  + (f"; {self.guard.skipped} non-finite batch(es) skipped" if self.guard.skipped else ""))
            if self.stopped:
                print(f"ended early: {self.stopped}")
            for line in self.summary_lines(summary):
                print(line)
            print(f"parameters sharded across {summary['processes']} processes (FSDP)" if self.sharded else
                  f"replicas in sync: True ({len(summary['replica_fingerprints'])} fingerprint(s))")
            print(f"checkpoint {summary['checkpoint']}, metrics {ckpt / 'metrics.jsonl'}"
                  + (f", plot {plot}" if plot else "")
                  + (f", final model {summary['model']}" if "model" in summary else ""))
        for tracker in self.accelerator.trackers:   # not end_training(): it also ends the process group, which
            tracker.finish()                        # the next trainer of a composed script needs

    def plot(self, path: Path) -> Path | None:
        if not self.plots or not self.log.rows:
            return None
        panels = {title: {label: self.log.series(key) for label, key in lines.items()}
                  for title, lines in self.plots.items()}
        return save_plot(path, panels, title=self.stage)

    def nothing_to_do(self, step: int) -> dict:
        if self.is_main and self.stopped:
            print(f"{self.stage}: this run ended at step {step} in {self.checkpoint_dir} ({self.stopped}); nothing "
                  f"to train")
        elif self.is_main:
            print(f"{self.stage}: already at step {step} of {self.config.steps} in {self.checkpoint_dir}; nothing "
                  f"to train (raise the number of steps to continue)")
        return {"stage": self.stage, "steps_run": 0, "final_step": step, "losses": [], "history": [],
                "checkpoint": str(self.checkpoint_dir / "last.pt")}

    # ------------------------------------------------------------------------------------------ checkpoints

    def restore(self, path: Path) -> None:
        state = read_training_state(path, self.stage)
        self.raw_model.load_weights(state["model"], str(path))
        saved = state["optimizer"]
        try:
            if self.sharded:   # names, as full_optimizer_state writes them
                load_full_optimizer_state(self.raw_model, self.optimizer, saved if has_names(saved) else
                                          named_optimizer_state(saved, self.param_names))
            else:
                self.optimizer.load_state_dict(indexed_optimizer_state(saved, self.param_names))
        except (ValueError, KeyError, RuntimeError) as err:
            raise RuntimeError(f"the optimizer state in {path} does not fit this run's trainable parameters "
                               f"({err}); resume with the settings the run was started with") from None
        torch.set_rng_state(state["rng"])
        self.global_step = self.saved_step = state["step"]
        self.stopped = state["trainer_state"].get("stopped")
        self.load_trainer_state(state["trainer_state"])

    def save_checkpoint(self) -> None:
        weights = optimizer = None
        if self.sharded:    # gathering is a collective: every process takes part, the main one writes
            weights = self.raw_model.weights()
            optimizer = full_optimizer_state(self.raw_model, self.optimizer)
        if self.is_main:
            if not self.sharded:
                weights = self.raw_model.weights()
                optimizer = named_optimizer_state(self.optimizer.state_dict(), self.param_names)
            save_training_state(self.checkpoint_dir / "last.pt", stage=self.stage, step=self.global_step,
                                model=self.raw_model, weights=weights, optimizer=optimizer,
                                trainer_config=asdict(self.config),
                                trainer_state={**self.trainer_state(), "stopped": self.stopped},
                                metadata=self.metadata)
        self.saved_step = self.global_step
        self.accelerator.wait_for_everyone()

    def checkpoint_note(self) -> str:
        if self.saved_step is None:
            return "no checkpoint was written in this run"
        return f"the last checkpoint, {self.checkpoint_dir / 'last.pt'} (step {self.saved_step}), is intact"

    def update_is_finite(self, loss: float, grad_norm, step: int) -> bool:
        return self.guard.ok(loss, grad_norm, f"{self.stage} step {step + 1}", self.checkpoint_note())


class GradientTrainer(Trainer):
    """A Trainer whose step sets the scheduled learning rate, accumulates `loss(step, micro)` over micro-batches,
    clips, checks the update is finite, and steps the optimizer over every trainable parameter of the model."""
    plots = {"loss": {"train": "loss", "held-out": "val_loss"}}

    def __init__(self, model, config: TrainConfig, *, accelerator=None, metadata=None):
        super().__init__(model, config, accelerator=accelerator, metadata=metadata)
        self.prepare(model, model.trainable_parameters())
        self.warmup = min(config.warmup, config.steps // 2)
        if self.warmup < config.warmup and self.is_main:
            print(f"warm-up shortened to {self.warmup} steps: half of a {config.steps}-step run")

    def loss(self, step: int, micro: int) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def training_step(self, step: int) -> dict:
        cfg, acc = self.config, self.accelerator
        lr = lr_at(step, lr=cfg.lr, warmup=self.warmup, total=cfg.steps, min_ratio=cfg.min_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        step_loss, metrics = 0.0, {}
        for micro in range(cfg.grad_accum):
            sync = micro == cfg.grad_accum - 1
            with nullcontext() if sync else acc.no_sync(self.model), acc.autocast():
                loss, m = self.loss(step, micro)
                acc.backward(loss / cfg.grad_accum)
            step_loss += loss.item() / cfg.grad_accum
            for k, v in m.items():
                metrics[k] = metrics.get(k, 0.0) + v / cfg.grad_accum
        ok = self.update_is_finite(step_loss, clip_gradients(acc, self.params, cfg.max_grad_norm), step)
        if ok:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": step_loss, "lr": lr, **metrics} if ok else {"lr": lr, "skipped": 1}

    def should_evaluate(self, done: int, end: int) -> bool:
        every = self.config.eval_interval
        return done == end or (every > 0 and done % every == 0)
