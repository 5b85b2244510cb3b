"""Pretraining: next-byte prediction on a corpus, reported in bits per character.

    trainer = PretrainTrainer(PaLM(PaLMConfig.preset("cpu")), load_corpus("enwik6"), PretrainConfig(steps=800))
    summary = trainer.train()          # summary["val_bpc"]; checkpoints, metrics and a plot in checkpoint_dir
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm import tqdm

from .config import TrainConfig
from .data import decode_bytes, random_windows, split_corpus
from .palm import PaLM, next_token_loss
from .training import GradientTrainer, step_generator
from .utils import bits_per_char, exists, option, require


@dataclass
class PretrainConfig(TrainConfig):
    steps: int = 2000
    lr: float = 1e-3
    weight_decay: float = 0.1
    checkpoint_dir: str = "checkpoints/pretrain"
    seq_len: int | None = option(None, "bytes per training window (default: the model's max_seq_len, at most 256)")
    val_fraction: float = option(0.05, "the last fraction of the corpus, held out for validation")
    eval_batches: int = option(40, "validation batches per evaluation (the same windows every time)")
    sample_interval: int = option(500, "print a KV-cached sample every N steps and at the end (0 = never)")
    sample_tokens: int = option(128, "bytes per printed sample")

    def __post_init__(self):
        super().__post_init__()
        require(self.seq_len is None or self.seq_len >= 1, self, "seq_len", "must be >= 1")
        require(0 < self.val_fraction < 1, self, "val_fraction", "must lie strictly between 0 and 1")
        require(self.eval_batches >= 1, self, "eval_batches", "must be >= 1")
        require(self.sample_interval >= 0, self, "sample_interval", "must be >= 0 (0 = never)")


@torch.no_grad()
def evaluate_bpc(model, val: Tensor, *, batches: int, batch_size: int, seq_len: int, accelerator) -> float:
    """Mean validation loss in bits per character over fixed windows (the same windows at every evaluation),
    averaged over processes."""
    model.eval()
    total = torch.zeros((), device=accelerator.device)
    for i in range(batches):
        g = step_generator(1234, i, rank=accelerator.process_index)
        x = random_windows(val, batch_size, seq_len, g).to(accelerator.device)
        with accelerator.autocast():
            total += next_token_loss(model(x[:, :-1]), x[:, 1:]).float()
    model.train()
    return bits_per_char(float(accelerator.reduce(total / batches, reduction="mean")))


class PretrainTrainer(GradientTrainer):
    stage = "pretrain"
    plots = {"bits per character": {"train": "bpc", "validation": "val_bpc"}}
    progress_keys = ("loss", "lr")

    def __init__(self, model: PaLM, data: Tensor, config: PretrainConfig | None = None, *,
                 val_data: Tensor | None = None, accelerator=None, metadata=None):
        config = config if exists(config) else PretrainConfig()
        self.seq_len = config.seq_len or min(256, model.config.max_seq_len)
        require(self.seq_len <= model.config.max_seq_len, config, "seq_len",
                f"exceeds the model's max_seq_len {model.config.max_seq_len}: pass a shorter window")
        self.train_data, self.val_data = ((data, val_data) if exists(val_data)
                                          else split_corpus(data, config.val_fraction))
        super().__init__(model, config, accelerator=accelerator, metadata=metadata)

    def loss(self, step: int, micro: int):
        cfg, acc = self.config, self.accelerator
        g = step_generator(cfg.seed, step, micro, acc.process_index)
        x = random_windows(self.train_data, cfg.batch_size, self.seq_len, g).to(acc.device)
        loss = next_token_loss(self.model(x[:, :-1]), x[:, 1:])
        return loss, {"bpc": bits_per_char(loss.item())}

    def evaluate(self) -> dict:
        cfg = self.config
        return {"val_bpc": evaluate_bpc(self.model, self.val_data, batches=cfg.eval_batches,
                                        batch_size=cfg.batch_size, seq_len=self.seq_len, accelerator=self.accelerator)}

    def after_step(self, done: int, end: int) -> None:
        every = self.config.sample_interval
        if every and (done % every == 0 or done == end) and self.is_main:
            tqdm.write(f"--- sample at step {done} ---\n{self.sample(done)}\n---")

    def sample(self, seed: int) -> str:
        """A KV-cached continuation of the first 64 validation bytes, marked |>>>| where the model takes over."""
        from .sampling import generate
        prompt = self.val_data[:64].long().to(self.accelerator.device)
        out = generate(self.raw_model, [prompt], self.config.sample_tokens, temperature=0.8, top_k=32,
                       generator=step_generator(self.config.seed, seed))
        return f"{decode_bytes(prompt)}|>>>|{decode_bytes(out.tokens[0])}"

    def on_train_begin(self, start: int, end: int, resumed: bool) -> None:
        if self.is_main:
            c, acc = self.raw_model.config, self.accelerator
            print(f"PaLM {c.dim}d x {c.depth} layers, {self.raw_model.num_params() / 1e6:.2f}M params | "
                  f"{len(self.train_data):,} train / {len(self.val_data):,} val bytes | {acc.num_processes} "
                  f"process(es) on {acc.device} | steps {start}->{end}" + (" (resumed)" if resumed else ""))

    def on_train_end(self, summary: dict) -> None:
        cfg = self.config
        tokens = cfg.batch_size * cfg.grad_accum * self.seq_len * self.accelerator.num_processes * summary["steps_run"]
        summary["tokens_per_s"] = round(tokens / summary["_seconds"])

    def summary_lines(self, summary: dict) -> list[str]:
        nan = float("nan")
        return [f"{summary['tokens_per_s']:,} tokens/s; final train loss {summary.get('final_train_loss', nan):.4f} "
                f"nats; validation {summary.get('val_bpc', nan):.4f} bits per char"]
