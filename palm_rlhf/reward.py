"""Reward model: a PaLM trunk with a scalar head, trained on human preferences (InstructGPT step 2,
https://arxiv.org/abs/2203.02155, section 3.5).

- The trunk is the pretrained / SFT PaLM with its own LoRA scope ("reward", the base weights shared and frozen) or,
  with lora_r=0, the whole PaLM fine-tuned (pass a copy if you want to keep the original).
- A learned segment embedding tells prompt tokens (0) from response tokens (1).
- The score is read from the final hidden state of the *last real token* of each sequence, wherever the padding is
  (right-padded pairs, or PPO's left-padded prompt + right-padded response).
- Losses: pairwise Bradley-Terry (optionally with a margin), rating bins (cross entropy), regression (MSE).
  Inference is deterministic: the scalar score, or for bins the expected rating under the bin distribution.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from beartype import beartype
from torch import Tensor, nn

from .lora import add_lora, lora_parameters, use_lora
from .palm import PaLM
from .utils import exists


def last_real_index(mask: Tensor) -> Tensor:
    """(b, n) bool -> (b,) index of the last True in each row."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask, positions, -1).amax(dim=-1).clamp(min=0)


class RewardModel(nn.Module):
    @beartype
    def __init__(self, palm: PaLM, *, lora_r: int = 8, lora_alpha: float = 16.0, scope: str = "reward",
                 num_bins: int | None = None, bin_values: list[float] | None = None):
        super().__init__()
        self.palm = palm
        self.scope = scope if lora_r > 0 else None
        self.lora_r = lora_r
        if self.scope:
            add_lora(palm, scope, r=lora_r, alpha=lora_alpha)
        dim = palm.config.dim
        self.segment_emb = nn.Embedding(2, dim)
        nn.init.zeros_(self.segment_emb.weight)
        self.num_bins = num_bins
        self.head = nn.Linear(dim, num_bins or 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        if exists(num_bins):
            values = bin_values if exists(bin_values) else list(range(num_bins))
            if len(values) != num_bins:
                raise ValueError(f"bin_values has {len(values)} entries for {num_bins} bins")
            self.register_buffer("bin_values", torch.tensor(values, dtype=torch.float32), persistent=False)

    def trainable_parameters(self) -> list[nn.Parameter]:
        head = list(self.segment_emb.parameters()) + list(self.head.parameters())
        return (lora_parameters(self.palm, self.scope) if self.scope else list(self.palm.parameters())) + head

    def freeze_base(self) -> None:
        """With LoRA, only the adapter and the head learn."""
        if self.scope:
            for p in self.palm.parameters():
                p.requires_grad_(False)
            for p in self.trainable_parameters():
                p.requires_grad_(True)

    def forward(self, tokens: Tensor, mask: Tensor, response_mask: Tensor) -> Tensor:
        """-> (b,) scores, or (b, num_bins) logits for a rating-bin model."""
        segments = self.segment_emb(response_mask.long())
        if self.scope:
            with use_lora(self.palm, self.scope):
                hidden = self.palm(tokens, mask=mask, return_hidden=True, extra_embed=segments)
        else:
            hidden = self.palm(tokens, mask=mask, return_hidden=True, extra_embed=segments)
        last = hidden[torch.arange(tokens.shape[0], device=tokens.device), last_real_index(mask)]
        out = self.head(last)
        return out if exists(self.num_bins) else out.squeeze(-1)

    @torch.no_grad()
    def score(self, tokens: Tensor, mask: Tensor, response_mask: Tensor) -> Tensor:
        """Deterministic scalar reward (b,): the score, or the expected rating for a bin model."""
        out = self(tokens, mask, response_mask).float()
        if exists(self.num_bins):
            return (out.softmax(dim=-1) * self.bin_values).sum(dim=-1)
        return out


def bradley_terry_loss(chosen: Tensor, rejected: Tensor, margin: float | Tensor = 0.0) -> Tensor:
    """-log sigmoid(r_chosen - r_rejected - margin), averaged over pairs."""
    return -F.logsigmoid(chosen.float() - rejected.float() - margin).mean()


def rating_bins_loss(logits: Tensor, bins: Tensor) -> Tensor:
    return F.cross_entropy(logits.float(), bins.long())


def regression_loss(scores: Tensor, ratings: Tensor) -> Tensor:
    return F.mse_loss(scores.float(), ratings.float())


def pairwise_accuracy(chosen: Tensor, rejected: Tensor) -> float:
    return (chosen > rejected).float().mean().item()


def load_reward_model(path) -> RewardModel:
    """A frozen RewardModel from a `train.py reward` checkpoint (no pickled code is executed)."""
    from .palm import PaLMConfig
    from .training import load_checkpoint
    state = load_checkpoint(path, stage="reward")
    extra = state["extra"]
    rm = RewardModel(PaLM(PaLMConfig.from_dict(state["config"])), lora_r=extra["lora_r"],
                     lora_alpha=extra["lora_alpha"], num_bins=extra.get("num_bins"))
    rm.load_state_dict(state["model"])
    return rm.eval().requires_grad_(False)
