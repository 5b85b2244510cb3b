"""Run settings every trainer shares. Each stage's config dataclass extends one of these and declares its own
defaults; each default lives in exactly one dataclass, and the CLI's flags (name, type, default, help) are generated
from the fields, so changing a default here changes the CLI with it.

    RunConfig      what any training run needs: length, optimiser, checkpoints, precision, guard, logging
    TrainConfig    + batches: micro-batch size, accumulation, warm-up and cosine schedule, evaluation interval
    FeedbackConfig + prompt/response examples from JSONL (SFT, reward models): length limit, held-out share
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from .utils import option, require


@dataclass
class RunConfig:
    steps: int = option(1000, "optimizer steps in total (PPO: iterations of rollout + learning)")
    stop_after: int | None = option(None, "stop after this many steps in this run, with a checkpoint; continue "
                                          "later with --resume auto")
    lr: float = option(1e-3, "peak learning rate")
    weight_decay: float = option(0.0, "AdamW weight decay (on matrices only, never on gains and biases)")
    betas: tuple[float, float] = option((0.9, 0.95), "AdamW betas")
    max_grad_norm: float = option(1.0, "clip the global gradient norm to this (0 = no clipping)")
    on_nonfinite: str = option("stop", "what a non-finite loss or gradient does: 'stop' the run (nothing is updated "
                                       "or saved, the last good checkpoint stays) or 'skip' that batch (gives up "
                                       "after 10 in a row)", choices=("stop", "skip"))
    seed: int = option(0, "seed of the initialisation and of every data draw")
    checkpoint_dir: str = option("checkpoints/run", "folder for last.pt, the final model, metrics, plots, summary")
    checkpoint_interval: int = option(500, "write last.pt every N steps (and at the end)")
    mixed_precision: str = option("no", "autocast precision", choices=("no", "fp16", "bf16"))
    cpu: bool = option(False, "run on the CPU even when a GPU is present")
    fsdp: bool = option(False, "shard parameters, gradients and optimizer state across the launched processes "
                               "(PyTorch FSDP2; also on under an accelerate config whose distributed type is FSDP)")
    quiet: bool = option(False, "no progress bar")
    log_with: str | None = option(None, "also log to an accelerate tracker, e.g. tensorboard or wandb")

    def __post_init__(self):
        self.betas = tuple(self.betas)
        for f in fields(self):
            choices = f.metadata.get("choices")
            if choices:
                require(getattr(self, f.name) in choices, self, f.name, f"choose one of {', '.join(choices)}")
        require(self.steps >= 0, self, "steps", "must be >= 0")
        require(self.stop_after is None or self.stop_after >= 1, self, "stop_after", "must be >= 1 (or unset)")
        require(self.lr > 0, self, "lr", "must be > 0")
        require(self.weight_decay >= 0, self, "weight_decay", "must be >= 0")
        require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), self, "betas",
                "two numbers in [0, 1)")
        require(self.max_grad_norm >= 0, self, "max_grad_norm", "must be >= 0 (0 = no clipping)")
        require(self.checkpoint_interval >= 1, self, "checkpoint_interval", "must be >= 1")


@dataclass
class TrainConfig(RunConfig):
    batch_size: int = option(16, "sequences per micro-batch per process")
    grad_accum: int = option(1, "micro-batches per optimizer step")
    warmup: int = option(100, "linear warm-up steps (at most half the run)")
    min_lr_ratio: float = option(0.1, "the cosine decay ends at lr * this")
    eval_interval: int = option(200, "evaluate on held-out data every N steps and at the end (0 = at the end only)")

    def __post_init__(self):
        super().__post_init__()
        require(self.batch_size >= 1, self, "batch_size", "must be >= 1")
        require(self.grad_accum >= 1, self, "grad_accum", "must be >= 1")
        require(self.warmup >= 0, self, "warmup", "must be >= 0")
        require(0 <= self.min_lr_ratio <= 1, self, "min_lr_ratio", "must lie in [0, 1]")
        require(self.eval_interval >= 0, self, "eval_interval", "must be >= 0")


@dataclass
class FeedbackConfig(TrainConfig):
    steps: int = 300
    lr: float = 3e-4
    warmup: int = 20
    eval_interval: int = 50
    checkpoint_interval: int = 100
    max_len: int = option(256, "prompt + response tokens (at most the model's max_seq_len); longer responses are cut, "
                                  "longer prompts dropped")
    val_fraction: float = option(0.1, "held out from the training file when no held-out file is given")

    def __post_init__(self):
        super().__post_init__()
        require(self.max_len >= 2, self, "max_len", "must be >= 2")
        require(0 < self.val_fraction < 1, self, "val_fraction", "must lie strictly between 0 and 1")
