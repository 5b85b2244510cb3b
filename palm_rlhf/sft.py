"""Supervised fine-tuning on demonstrations (InstructGPT step 1, https://arxiv.org/abs/2203.02155): next-token loss
on the response tokens only, the prompt as context.

    trainer = SFTTrainer(PaLM.load("checkpoints/pretrain/last.pt"), [{"prompt": ..., "response": ...}, ...])
    trainer.train()             # CHECKPOINT_DIR/model: the fine-tuned PaLM, adapter merged, ready for the next stage

With LoRA (the default) the trainer adds an "sft" adapter to the model and freezes the base weights (lora.py's one
freezing rule); with `SFTConfig(lora=LoRAConfig(r=0))` every weight learns.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .config import FeedbackConfig
from .data import draw
from .feedback import chunks, collate, load_demonstrations, load_examples
from .lora import LoRAConfig, add_trainable_lora, set_lora
from .palm import PaLM, next_token_loss
from .training import GradientTrainer, step_generator
from .utils import bits_per_char, exists, option


@dataclass
class SFTConfig(FeedbackConfig):
    checkpoint_dir: str = "checkpoints/sft"
    lora: LoRAConfig = option(LoRAConfig(), "adapters the trainer adds (r = 0: fine-tune every weight)")


class SFTTrainer(GradientTrainer):
    stage = "sft"
    plots = {"response loss (nats)": {"train": "loss", "held-out": "val_loss"}}

    def __init__(self, model: PaLM, train: list[dict] | str | Path, config: SFTConfig | None = None, *,
                 val: list[dict] | str | Path | None = None, accelerator=None, metadata=None):
        config = config if exists(config) else SFTConfig()
        max_len = min(config.max_len, model.config.max_seq_len)
        _, self.train_set, self.val_set = load_examples(train, val, load_demonstrations, ("response",), max_len,
                                                        config.val_fraction)
        if config.lora.enabled:
            add_trainable_lora(model, "sft", config.lora)
            set_lora(model, "sft")
            model.policy_scope = "sft"
        super().__init__(model, config, accelerator=accelerator, metadata=metadata)

    def response_loss(self, items) -> torch.Tensor:
        b = {k: v.to(self.accelerator.device) for k, v in collate([e[0] for e in items]).items()}
        logits = self.model(b["tokens"][:, :-1], mask=b["mask"][:, :-1])
        return next_token_loss(logits, b["tokens"][:, 1:], b["response_mask"][:, 1:])

    def loss(self, step: int, micro: int):
        g = step_generator(self.config.seed, step, micro, self.accelerator.process_index)
        return self.response_loss(draw(self.train_set, self.config.batch_size, g)), {}

    @torch.no_grad()
    def evaluate(self) -> dict:
        self.model.eval()
        losses = [self.response_loss(chunk).item() for chunk in chunks(self.val_set, self.config.batch_size)]
        self.model.train()
        loss = sum(losses) / len(losses)
        return {"val_loss": loss, "val_bpc": bits_per_char(loss)}

    def final_model(self) -> PaLM:
        return PaLM.policy_of(self.raw_model)  # the adapter merged: a plain PaLM for the next stage

    def summary_lines(self, summary: dict) -> list[str]:
        return [f"held-out response loss {summary.get('val_loss', float('nan')):.4f} nats "
                f"({summary.get('val_bpc', float('nan')):.4f} bits/byte)"]
