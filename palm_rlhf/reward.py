"""Reward model: a PaLM trunk with a scalar head, trained on human preferences (InstructGPT step 2,
https://arxiv.org/abs/2203.02155, section 3.5).

- The trunk is the pretrained / SFT PaLM with its own LoRA scope ("reward", the base weights frozen on construction,
  so the same PaLM can also carry the PPO actor and critic) or, with LoRAConfig(r=0), the whole PaLM fine-tuned
  (pass a copy if you want to keep the original).
- A learned segment embedding tells prompt tokens (0) from response tokens (1).
- The score is read from the final hidden state of the *last real token* of each sequence, wherever the padding is
  (right-padded pairs, or PPO's left-padded prompt + right-padded response): `pool="last"`, as InstructGPT does.
  `pool="sum"` scores every response token and sums the scores instead: a judge that adds up what each word
  contributes (a sentiment lexicon, say) is then a sum of local readings; on the sentiment task (README) it learned
  the judge better than the last-token head, which stayed at chance. DPO's implicit reward is a sum over tokens too.
- Losses: pairwise Bradley-Terry (optionally with a margin), rating bins (cross entropy), regression (MSE).
  Inference is deterministic: the scalar score, or for bins the expected rating under the bin distribution.

    rm = RewardModel(PaLM.load("checkpoints/sft/model"))
    RewardTrainer(rm, [{"prompt": ..., "chosen": ..., "rejected": ...}, ...], RewardConfig(steps=250)).train()
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from beartype import beartype
from torch import Tensor, nn

from .checkpoint import Checkpointable, register
from .config import FeedbackConfig
from .data import draw
from .feedback import chunks, collate, load_examples, load_preferences, load_ratings
from .lora import LoRAConfig, add_trainable_lora, keep_scopes, lora_parameters, use_lora
from .palm import PaLM, PaLMConfig
from .training import GradientTrainer, step_generator
from .utils import exists, option, require


POOLS = ("last", "sum")  # the score from the last real token's state, or the sum of every response token's


def last_real_index(mask: Tensor) -> Tensor:
    """(b, n) bool -> (b,) index of the last True in each row."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask, positions, -1).amax(dim=-1).clamp(min=0)


@register("reward_model")
class RewardModel(Checkpointable, nn.Module):
    @beartype
    def __init__(self, palm: PaLM, *, lora: LoRAConfig = LoRAConfig(), scope: str = "reward",
                 num_bins: int | None = None, bin_values: list[float] | None = None, pool: str = "last"):
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {', '.join(POOLS)}, got {pool!r}")
        self.pool = pool
        self.palm = palm
        self.lora = lora if lora.enabled else None
        self.scope = scope if lora.enabled else None
        if self.scope:
            add_trainable_lora(palm, scope, lora)
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

    def own_parameters(self) -> list[nn.Parameter]:
        """What belongs to this reward model alone: its adapter and head (with LoRA), or everything (without)."""
        if not self.scope:
            return list(self.parameters())
        head = list(self.segment_emb.parameters()) + list(self.head.parameters())
        return lora_parameters(self.palm, self.scope) + head

    def config_dict(self) -> dict:
        return {"kind": self.kind, "model": self.palm.config.to_dict(),
                "lora": self.lora.to_dict() if self.lora else None, "scope": self.scope or "reward",
                "num_bins": self.num_bins, "pool": self.pool,
                "bin_values": self.bin_values.tolist() if exists(self.num_bins) else None,
                "policy": {"prefix": "palm.", "scope": None, "lora": None}}

    @classmethod
    def from_config_dict(cls, config: dict) -> "RewardModel":
        lora = LoRAConfig(**config["lora"]) if config.get("lora") else LoRAConfig(r=0)
        return cls(PaLM(PaLMConfig.from_dict(config["model"])), lora=lora, scope=config.get("scope", "reward"),
                   num_bins=config.get("num_bins"), bin_values=config.get("bin_values"),
                   pool=config.get("pool", "last"))

    def weights(self) -> dict[str, Tensor]:
        return keep_scopes(self.full_state_dict(), [self.scope] if self.scope else [])  # not a shared trunk's others

    def hidden(self, tokens: Tensor, mask: Tensor, response_mask: Tensor) -> Tensor:
        segments = self.segment_emb(response_mask.long())
        if self.scope:
            with use_lora(self.palm, self.scope):
                return self.palm(tokens, mask=mask, return_hidden=True, extra_embed=segments)
        return self.palm(tokens, mask=mask, return_hidden=True, extra_embed=segments)

    def forward(self, tokens: Tensor, mask: Tensor, response_mask: Tensor) -> Tensor:
        """tokens, mask (real tokens), response_mask (response tokens) (b, n) -> (b,) scores, or (b, num_bins)
        logits for a rating-bin model."""
        hidden = self.hidden(tokens, mask, response_mask)
        if self.pool == "sum":
            per_token = F.linear(hidden, self.head.weight) * (mask & response_mask.bool())[..., None]
            out = per_token.sum(dim=1) + self.head.bias
        else:
            out = self.head(hidden[torch.arange(tokens.shape[0], device=tokens.device), last_real_index(mask)])
        return out if exists(self.num_bins) else out.squeeze(-1)

    @torch.no_grad()
    def score(self, tokens: Tensor, mask: Tensor, response_mask: Tensor) -> Tensor:
        """Deterministic scalar reward (b,): the score, or the expected rating for a bin model."""
        out = self(tokens, mask, response_mask).float()
        if exists(self.num_bins):
            return (out.softmax(dim=-1) * self.bin_values).sum(dim=-1)
        return out


    @torch.no_grad()
    def token_scores(self, tokens: Tensor, mask: Tensor, response_mask: Tensor) -> tuple[Tensor, Tensor]:
        """A summed model's score split over the tokens that earned it: (b, n) per-token scores (0 off the response;
        each depends on the tokens up to and including its own) and (b,) their sums plus the bias, i.e. score()."""
        if self.pool != "sum" or exists(self.num_bins):
            raise ValueError("token_scores needs a summed scalar reward model (RewardModel(pool='sum')); this one has "
                             f"pool={self.pool!r}" + (" and rating bins" if exists(self.num_bins) else ""))
        hidden = self.hidden(tokens, mask, response_mask)
        per_token = F.linear(hidden, self.head.weight).squeeze(-1).float() * (mask & response_mask.bool())
        return per_token, per_token.sum(dim=1) + self.head.bias.float()


def bradley_terry_loss(chosen: Tensor, rejected: Tensor, margin: float | Tensor = 0.0) -> Tensor:
    """-log sigmoid(r_chosen - r_rejected - margin), averaged over pairs."""
    return -F.logsigmoid(chosen.float() - rejected.float() - margin).mean()


def rating_bins_loss(logits: Tensor, bins: Tensor) -> Tensor:
    return F.cross_entropy(logits.float(), bins.long())


def regression_loss(scores: Tensor, ratings: Tensor) -> Tensor:
    return F.mse_loss(scores.float(), ratings.float())


def pairwise_accuracy(chosen: Tensor, rejected: Tensor) -> float:
    return (chosen > rejected).float().mean().item()

# ---------------------------------------------------------------------------------------------------- trainer


@dataclass
class RewardConfig(FeedbackConfig):
    betas: tuple[float, float] = (0.9, 0.999)
    checkpoint_dir: str = "checkpoints/reward"
    objective: str = option("pairwise", "pairwise: Bradley-Terry on preference pairs; bins: cross entropy over "
                            "rating bins; regression: MSE on ratings", choices=("pairwise", "bins", "regression"))
    num_bins: int = option(5, "objective bins: ratings 0..n-1 (the model gets n outputs)")
    margin: float = option(0.0, "Bradley-Terry margin")
    pool: str = option("last", "reward head: the last token's state (last) or a score per response token, summed "
                       "(sum: for judges that add up words, e.g. sentiment)", choices=POOLS)

    def __post_init__(self):
        super().__post_init__()
        require(self.num_bins >= 2, self, "num_bins", "must be >= 2")


class RewardTrainer(GradientTrainer):
    """Trains a RewardModel on preference pairs (or ratings). gold_fn(text) -> float, when given, is a known judge
    the held-out pairs are also scored against (e.g. the demo task's)."""
    stage = "reward"
    progress_keys = ("loss", "acc")

    def __init__(self, model: RewardModel, train: list[dict] | str | Path, config: RewardConfig | None = None, *,
                 val: list[dict] | str | Path | None = None, gold_fn: Callable[[str], float] | None = None,
                 accelerator=None, metadata=None):
        config = config if exists(config) else RewardConfig()
        self.pairwise = config.objective == "pairwise"
        if config.objective == "bins" and model.num_bins != config.num_bins:
            raise ValueError(f"objective 'bins' with num_bins {config.num_bins} needs RewardModel(..., "
                             f"num_bins={config.num_bins}); this one has num_bins={model.num_bins}")
        if model.pool != config.pool:
            raise ValueError(f"RewardConfig(pool={config.pool!r}) needs RewardModel(..., pool={config.pool!r}); this "
                             f"one has pool={model.pool!r}")
        loader, keys = (load_preferences, ("chosen", "rejected")) if self.pairwise else (load_ratings, ("response",))
        max_len = min(config.max_len, model.palm.config.max_seq_len)
        val_ex, self.train_set, self.val_set = load_examples(train, val, loader, keys, max_len, config.val_fraction)
        self.gold_labels = None  # which response the gold judge prefers, for each held-out pair, and by how much
        if exists(gold_fn) and self.pairwise:
            gold = torch.tensor([[gold_fn(ex["chosen"]), gold_fn(ex["rejected"])] for ex in val_ex],
                                dtype=torch.float64)
            self.gold_labels, self.gold_gaps = gold[:, 0] > gold[:, 1], (gold[:, 0] - gold[:, 1]).abs()
            self.gold_correct = None
        if self.pairwise:
            self.plots = {**self.plots, "pairwise accuracy": {"train batch": "acc", "held-out": "val_acc",
                                                              "held-out vs gold": "val_gold_acc"}}
        super().__init__(model, config, accelerator=accelerator, metadata=metadata)

    def forward(self, items) -> tuple[Tensor, tuple]:
        """-> loss, scores (pairwise: chosen, rejected; pairs are interleaved into one batch)"""
        cfg, device = self.config, self.accelerator.device
        b = {k: v.to(device) for k, v in collate([e for pair in items for e in pair]).items()}
        out = self.model(b["tokens"], b["mask"], b["response_mask"])
        if self.pairwise:
            chosen, rejected = out[0::2], out[1::2]
            return bradley_terry_loss(chosen, rejected, cfg.margin), (chosen, rejected)
        target = torch.tensor([e[0].rating for e in items], device=device)
        if cfg.objective == "bins":
            return rating_bins_loss(out, target.round().clamp(0, cfg.num_bins - 1)), (out,)
        return regression_loss(out, target), (out,)

    def loss(self, step: int, micro: int):
        g = step_generator(self.config.seed, step, micro, self.accelerator.process_index)
        loss, scores = self.forward(draw(self.train_set, self.config.batch_size, g))
        return loss, ({"acc": pairwise_accuracy(*scores)} if self.pairwise else {})

    @torch.no_grad()
    def evaluate(self) -> dict:
        self.model.eval()
        losses, chosen, rejected = [], [], []
        for chunk in chunks(self.val_set, self.config.batch_size):
            loss, scores = self.forward(chunk)
            losses.append(loss.item() * len(chunk))
            if self.pairwise:
                chosen.append(scores[0].float().cpu())
                rejected.append(scores[1].float().cpu())
        self.model.train()
        out = {"val_loss": sum(losses) / len(self.val_set)}
        if self.pairwise:
            c, r = torch.cat(chosen), torch.cat(rejected)
            out["val_acc"] = pairwise_accuracy(c, r)
            if exists(self.gold_labels):
                self.gold_correct = (c > r) == self.gold_labels
                out["val_gold_acc"] = self.gold_correct.float().mean().item()
        return out

    def on_train_end(self, summary: dict) -> None:
        if exists(self.gold_labels):
            summary["gold_label_agreement"] = self.gold_labels.float().mean().item()
            summary["gold_acc_by_gap"] = accuracy_by_gap(self.gold_correct, self.gold_gaps)

    def summary_lines(self, summary: dict) -> list[str]:
        lines = [f"held-out loss {summary.get('val_loss', float('nan')):.4f}"]
        if self.pairwise:
            lines.append(f"held-out pairwise accuracy vs the labels: {summary.get('val_acc', float('nan')):.1%}")
        if "gold_label_agreement" in summary:
            lines.append(f"held-out accuracy vs the gold judge: {summary['val_gold_acc']:.1%} (the gold judge "
                         f"itself agrees with the noisy labels on {summary['gold_label_agreement']:.1%}: the ceiling)")
            lines += [f"  gold gap {b['gap_from']:.3f}-{b['gap_to']:.3f}: {b['accuracy']:.1%} of {b['pairs']} pairs"
                      for b in summary["gold_acc_by_gap"]]
        return lines


def accuracy_by_gap(correct: Tensor, gaps: Tensor, bins: int = 3) -> list[dict]:
    """Accuracy against the gold judge in `bins` equal-count bins of the gold score gap (small gaps are hard)."""
    order = gaps.argsort()
    return [{"gap_from": gaps[idx].min().item(), "gap_to": gaps[idx].max().item(), "pairs": len(idx),
             "accuracy": correct[idx].float().mean().item()} for idx in order.tensor_split(bins) if len(idx)]
