"""Direct Preference Optimization: the policy learns from preference pairs directly, with no reward model and no
sampling during training (Rafailov et al. 2023, https://arxiv.org/abs/2305.18290).

With h = (log pi(chosen) - log pi(rejected)) - (log ref(chosen) - log ref(rejected)), sequence log-probs summed over
the response tokens, per pair:
    sigmoid (DPO)    -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)     eps: label smoothing (cDPO)
    ipo   (IPO)      (h - 1 / (2 beta))^2               (Azar et al. 2023, https://arxiv.org/abs/2310.12036)
The implicit reward of a response is beta (log pi - log ref); its accuracy and margin on held-out pairs are logged.

The policy is a `Policy` (policy.py): a LoRA scope on the PaLM with the reference being the same weights with the
adapter off (no second model), or with LoRAConfig(r=0) the whole PaLM against a frozen copy. The reference's
log-probs never change, so each pair's are computed once, the first time the pair is drawn, and kept (in the
checkpoint too, so a resumed run continues exactly). At evaluation the trainer also samples the policy on held-out
prompts: KL to the reference (nats per response, from the samples) and, given a judge, its score.

    policy = Policy(PaLM.load("checkpoints/sft/model"), lora=LoRAConfig(r=16))
    DPOTrainer(policy, "prefs.jsonl", DPOConfig(beta=0.1), gold_fn=sentiment).train()
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import FeedbackConfig
from .feedback import chunks, collate, held_out_prompts, load_examples, load_preferences
from .judges import Judge
from .palm import PaLM
from .policy import Policy
from .rollout import evaluate_policy, results_table, score_gain
from .training import GradientTrainer, step_generator
from .utils import exists, option, require


def sequence_logprobs(logits: Tensor, tokens: Tensor, response_mask: Tensor) -> Tensor:
    """Summed log-probs (b,) of the response tokens; logits (b, n - 1, v) are the model's outputs for tokens[:, :-1]."""
    logp = logits.float().log_softmax(-1).gather(-1, tokens[:, 1:, None]).squeeze(-1)
    return (logp * response_mask[:, 1:]).sum(-1)


def dpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor, *,
             beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """-> mean loss, implicit rewards of the chosen and the rejected responses (b,) (detached)."""
    h = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"loss_type must be 'sigmoid' or 'ipo', got {loss_type!r}")
    return (losses.mean(), beta * (policy_chosen - ref_chosen).detach(),
            beta * (policy_rejected - ref_rejected).detach())


@dataclass
class DPOConfig(FeedbackConfig):
    lr: float = 5e-4
    checkpoint_dir: str = "checkpoints/dpo"
    batch_size: int = option(16, "preference pairs per micro-batch per process")
    beta: float = option(0.1, "strength of the tie to the reference (DPO's beta; IPO's tau)")
    loss_type: str = option("sigmoid", "sigmoid: DPO; ipo: IPO's squared loss", choices=("sigmoid", "ipo"))
    label_smoothing: float = option(0.0, "share of labels assumed flipped (conservative DPO; sigmoid loss only)")
    eval_prompts: int = option(64, "held-out prompts the policy answers at each evaluation (KL, judge); 0 = none")
    max_new_tokens: int = option(64, "response length when sampling at evaluation")
    temperature: float = option(1.0, "sampling temperature at evaluation (> 0)")
    eos_token: int | None = option(None, "token that ends a sampled response (none: always max_new_tokens)")

    def __post_init__(self):
        super().__post_init__()
        require(self.beta > 0, self, "beta", "must be > 0")
        require(0 <= self.label_smoothing < 0.5, self, "label_smoothing", "must lie in [0, 0.5)")
        require(self.loss_type == "sigmoid" or self.label_smoothing == 0, self, "label_smoothing",
                "applies to the sigmoid loss only")
        require(self.eval_prompts >= 0, self, "eval_prompts", "must be >= 0")
        require(self.max_new_tokens >= 1, self, "max_new_tokens", "must be >= 1")
        require(self.temperature > 0, self, "temperature", "must be > 0")


class DPOTrainer(GradientTrainer):
    """Trains a Policy on preference pairs with DPO or IPO. gold_fn(text) -> float, when given, scores the policy's
    samples on held-out prompts at each evaluation (and before training, for the before/after table)."""
    stage = "dpo"
    summary_file = "eval.json"
    progress_keys = ("loss", "acc", "margin")
    plots = {"loss": {"train": "loss", "held-out": "val_loss"},
             "implicit reward accuracy": {"train batch": "acc", "held-out": "val_acc"},
             "implicit rewards": {"chosen": "chosen_reward", "rejected": "rejected_reward",
                                  "held-out margin": "val_margin"},
             "sampled KL to the reference (nats)": {"held-out prompts": "kl"},
             "gold score": {"held-out prompts": "gold_score"}}

    def __init__(self, policy: Policy, train: list[dict] | str | Path, config: DPOConfig | None = None, *,
                 val: list[dict] | str | Path | None = None, gold_fn: Judge | None = None, accelerator=None,
                 metadata=None):
        config = config if exists(config) else DPOConfig()
        max_len = min(config.max_len, policy.palm.config.max_seq_len)
        _, self.train_set, self.val_set = load_examples(train, val, load_preferences, ("chosen", "rejected"),
                                                        max_len, config.val_fraction)
        super().__init__(policy, config, accelerator=accelerator, metadata=metadata)
        self.policy, self.gold_fn = policy, gold_fn
        # the reference's log-probs of (chosen, rejected) for each training / held-out pair; nan until first needed
        self.ref_cache = {"train": torch.full((len(self.train_set), 2), float("nan"), dtype=torch.float64),
                          "val": torch.full((len(self.val_set), 2), float("nan"), dtype=torch.float64)}
        self.eval_set = held_out_prompts(self.val_set, config.eval_prompts)
        self.before: dict | None = None

    def batch_logprobs(self, items, reference: bool = False) -> Tensor:
        """(b, 2) summed response log-probs of (chosen, rejected) under the policy, or the reference (no grad)."""
        b = {k: v.to(self.accelerator.device) for k, v in collate([e for pair in items for e in pair]).items()}
        inputs, mask = b["tokens"][:, :-1], b["mask"][:, :-1]
        logits = self.policy.reference_logits(inputs, mask) if reference else self.model(inputs, mask)
        return sequence_logprobs(logits, b["tokens"], b["response_mask"]).view(-1, 2)

    def reference_logprobs(self, split: str, indices: list[int], items) -> Tensor:
        """The cached reference log-probs of these pairs, computing the ones never seen before in one batch."""
        cache = self.ref_cache[split]
        missing = {i: j for j, i in enumerate(indices) if torch.isnan(cache[i, 0])}  # each pair once
        if missing:
            with torch.no_grad():
                values = self.batch_logprobs([items[j] for j in missing.values()], reference=True)
            cache[list(missing)] = values.double().cpu()
        return cache[indices].to(self.accelerator.device, torch.float32)

    def forward(self, split: str, indices: list[int]) -> tuple[Tensor, dict]:
        cfg = self.config
        items = [(self.train_set if split == "train" else self.val_set)[i] for i in indices]
        ref = self.reference_logprobs(split, indices, items)
        pol = self.batch_logprobs(items)
        loss, chosen, rejected = dpo_loss(pol[:, 0], pol[:, 1], ref[:, 0], ref[:, 1], beta=cfg.beta,
                                          loss_type=cfg.loss_type, label_smoothing=cfg.label_smoothing)
        return loss, {"acc": (chosen > rejected).float().mean().item(), "margin": (chosen - rejected).mean().item(),
                      "chosen_reward": chosen.mean().item(), "rejected_reward": rejected.mean().item()}

    def loss(self, step: int, micro: int):
        g = step_generator(self.config.seed, step, micro, self.accelerator.process_index)
        indices = torch.randint(len(self.train_set), (self.config.batch_size,), generator=g).tolist()
        return self.forward("train", indices)

    @torch.no_grad()
    def evaluate(self) -> dict:
        self.model.eval()
        totals, n = {}, len(self.val_set)
        for chunk in chunks(list(range(n)), self.config.batch_size):
            loss, m = self.forward("val", chunk)
            for k, v in {"loss": loss.item(), **m}.items():
                totals[k] = totals.get(k, 0.0) + v * len(chunk) / n
        out = {f"val_{k}": v for k, v in totals.items()}
        if self.eval_set:
            out.update({k: v for k, v in self.sample_policy(actor=True).items() if isinstance(v, float)})
        self.model.train()
        return out

    def sample_policy(self, actor: bool) -> dict:
        """The policy (or the reference) answering the held-out prompts: KL to the reference, judge's score."""
        g = torch.Generator().manual_seed(self.config.seed + 10_007)  # the same draw at every evaluation
        return evaluate_policy(self.policy, None, self.eval_set, self.config, g, actor=actor, gold_fn=self.gold_fn,
                               autocast=self.accelerator.autocast)

    def on_train_begin(self, start: int, end: int, resumed: bool) -> None:
        if self.eval_set and self.before is None:
            self.before = self.sample_policy(actor=False)

    def on_train_end(self, summary: dict) -> None:
        if not self.eval_set:
            return
        after = self.sample_policy(actor=True)
        summary["results"] = {"reference policy (before)": self.before, "trained policy (after)": after}
        if exists(self.gold_fn):
            summary["gold_gain_in_std"], summary["gold_gain_stderr"] = score_gain(self.before, after)

    def summary_lines(self, summary: dict) -> list[str]:
        lines = [f"held-out pairs: loss {summary.get('val_loss', float('nan')):.4f}, implicit reward accuracy "
                 f"{summary.get('val_acc', float('nan')):.1%}, margin {summary.get('val_margin', float('nan')):.3f}"]
        if "results" in summary:
            keys = ["gold_score", "kl"] if exists(self.gold_fn) else ["kl"]
            lines += [f"on {len(self.eval_set)} held-out prompts:", *results_table(summary["results"], keys)]
        if "gold_gain_in_std" in summary:
            lines.append(f"gold score change: {summary['gold_gain_in_std']:+.2f} +- {summary['gold_gain_stderr']:.2f} "
                         f"(standard error over prompts) standard deviations of the reference's scores")
        return lines

    def final_model(self) -> PaLM:
        return PaLM.policy_of(self.policy)  # the policy as a plain PaLM, its adapter merged

    def trainer_state(self) -> dict:
        return {"before": self.before, "ref_cache": self.ref_cache}

    def load_trainer_state(self, state: dict) -> None:
        self.before = state["before"]
        self.ref_cache = state["ref_cache"]
