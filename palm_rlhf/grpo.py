"""Critic-free online RL: GRPO and RLOO. No value model: G responses per prompt are sampled in one batch, and each
response's advantage is its reward minus a baseline made of the others in its group.

- GRPO (Shao et al. 2024, DeepSeekMath, https://arxiv.org/abs/2402.03300): advantage = (r - group mean) / scale;
  per-token clipped ratio, here with separate low / high clip ranges (DAPO's clip-higher,
  https://arxiv.org/abs/2503.14476); the KL to the reference is the k3 estimator exp(ref - lp) - (ref - lp) - 1 added
  to the loss with coefficient kl_coef (0 turns it off; it is reported either way).
- RLOO (Ahmadian et al. 2024, https://arxiv.org/abs/2402.14740): the reward first pays the sequence's k1 KL,
  r = score - kl_coef * sum_t (lp - ref), and the baseline is the mean of the *other* G - 1 rewards of the group
  (so the advantage is G / (G - 1) times GRPO's unscaled one).

Choices, with their defaults:
- scale_rewards: "batch" (default) divides by the standard deviation of all of a step's rewards; "group" by the
  group's own (GRPO as published); "none" not at all (Dr. GRPO, https://arxiv.org/abs/2503.20783). A group's own std
  weights a group by how little its rewards differ: with a sparse judge a group of [0, 0, 0, 0.05] gets the same
  push as one of [0, 0, 0, 0.9]. Dividing by the batch's std keeps Dr. GRPO's point (no per-group reweighting) and
  still makes the learning rate independent of the reward's units; a group whose rewards are all equal gets zero
  advantage either way, never NaN.
- loss_type: how token losses are averaged. "constant" (default; Dr. GRPO): sum over the minibatch's tokens / (rows x
  max_new_tokens), the same weight for every token whatever the length of its response; "token" (DAPO): / the
  minibatch's real tokens; "sequence" (GRPO as published): mean over each response, then over responses, which
  favours short responses' tokens. With fixed-length responses (no eos_token) the three are equal.
- dense_reward (off by default; needs a summed reward model, `train.py reward --pool sum`): each token is credited
  with the reward still to come from it, sum_{u >= t} r_u, where r_u is the reward model's score of token u (the
  bias at the last token; for RLOO minus kl_coef x token u's k1 KL), and the baseline is the same sum at position t
  averaged over the group (leave-one-out: over the others). A token is then not credited with words written before
  it, which the sequence's single advantage does. Scores all at the last token give every position the sequence
  reward: the sequence advantage exactly, which is how it is tested.

    trainer = GRPOTrainer(Policy(palm), reward, prompts, GRPOConfig(group_size=8))
    trainer.train()     # before/after table on held-out prompts, checkpoints, CHECKPOINT_DIR/model = the policy
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor

from .config import RunConfig
from .judges import Judge, judge_texts
from .metrics import save_plot
from .policy import Policy
from .rollout import (OnlineRLTrainer, clip_rewards, gold_panels, require_summed, response_logprobs, sample,
                      score)
from .training import clip_gradients
from .utils import exists, option, require

SCALES = ("batch", "group", "none")
LOSS_TYPES = ("constant", "token", "sequence")


@dataclass
class GroupConfig(RunConfig):
    """What GRPO and RLOO share."""
    steps: int = 100
    lr: float = 5e-4
    betas: tuple[float, float] = (0.9, 0.999)
    checkpoint_interval: int = 10
    prompts_per_iter: int = option(4, "prompts per step, per process")
    group_size: int = option(8, "responses sampled per prompt (G): the baseline is made of the others")
    max_new_tokens: int = option(64, "response length")
    temperature: float = option(1.0, "sampling temperature of the rollouts (> 0)")
    eos_token: int | None = option(None, "token that ends a response (none: always max_new_tokens)")
    kl_coef: float = option(0.05, "weight of the KL to the reference policy")
    kl_budget: float = option(0.0, "end the run at the first step whose rollouts' KL to the reference passes this "
                                   "(nats per response), before learning from them (0 = off)")
    scale_rewards: str = option("batch", "divide advantages by the std of the step's rewards ('batch'), of their "
                                         "group ('group', GRPO as published) or not at all ('none', Dr. GRPO)",
                                choices=SCALES)
    loss_type: str = option("constant", "token-loss averaging: 'constant' (Dr. GRPO), 'token' (DAPO), 'sequence' "
                                        "(GRPO as published)", choices=LOSS_TYPES)
    epochs: int = option(1, "passes over each step's samples (1: each sample is learned from once)")
    minibatch_size: int = option(16, "responses per learning minibatch")
    clip_low: float = option(0.2, "ratio clip below 1 (1 - clip_low)")
    clip_high: float = option(0.2, "ratio clip above 1 (1 + clip_high; DAPO's clip-higher uses 0.28)")
    dense_reward: bool = option(False, "with a summed reward model (pool sum): credit each token with the reward "
                                       "still to come from it, baselined by the group at the same position "
                                       "(module docstring); off: one advantage per response")
    reward_clip: float = option(0.0, "clip scores to +-this (0 = off: group advantages ignore the scores' offset and "
                                     "scale, which a clip would not)")
    eval_prompts: int = option(256, "held-out prompts for the before/after table")
    best_of: int = option(8, "N of the best-of-N baseline in the table (0 or 1 = skip)")

    def __post_init__(self):
        super().__post_init__()
        for name in ("prompts_per_iter", "max_new_tokens", "epochs", "minibatch_size"):
            require(getattr(self, name) >= 1, self, name, "must be >= 1")
        require(self.group_size >= 2, self, "group_size", "needs >= 2 responses per prompt (a baseline of others)")
        require(self.prompts_per_iter * self.group_size % self.minibatch_size == 0, self, "minibatch_size",
                f"must divide prompts_per_iter x group_size ({self.prompts_per_iter * self.group_size})")
        require(self.temperature > 0, self, "temperature", "must be > 0")
        require(self.kl_coef >= 0, self, "kl_coef", "must be >= 0")
        for name in ("clip_low", "clip_high", "reward_clip", "kl_budget", "best_of"):
            require(getattr(self, name) >= 0, self, name, "must be >= 0")
        require(self.eval_prompts >= 2, self, "eval_prompts", "the before/after table needs at least 2 prompts")


@dataclass
class GRPOConfig(GroupConfig):
    checkpoint_dir: str = "checkpoints/grpo"


@dataclass
class RLOOConfig(GroupConfig):
    checkpoint_dir: str = "checkpoints/rloo"
    scale_rewards: str = option("none", "as GRPO's; RLOO as published does not scale ('none')", choices=SCALES)

# ---------------------------------------------------------------------------------------------------- maths


def group_advantages(rewards: Tensor, group_size: int, *, leave_one_out: bool = False, scale: str = "batch",
                     eps: float = 1e-6) -> Tensor:
    """(b,) rewards, groups of `group_size` consecutive rows -> (b,) advantages: reward minus the group mean (or,
    leave_one_out, minus the mean of the group's other rewards), divided per `scale` (see the module docstring).
    Equal rewards in a group give zeros, never NaN."""
    r = rewards.view(-1, group_size)
    mean = r.mean(dim=1, keepdim=True)
    adv = (r - mean) * (group_size / (group_size - 1) if leave_one_out else 1.0)   # r - (sum - r) / (G - 1)
    if scale == "group":
        adv = adv / (r.std(dim=1, keepdim=True) + eps)
    elif scale == "batch":
        adv = adv / (rewards.std() + eps)
    return adv.reshape(-1)


def dense_group_advantages(rewards: Tensor, mask: Tensor, group_size: int, *, leave_one_out: bool = False,
                           scale: str = "batch", eps: float = 1e-6) -> Tensor:
    """(b, t) per-token rewards of responses (mask: real tokens), groups of `group_size` consecutive rows -> (b, t)
    advantages: each token's reward-to-go minus the group's mean reward-to-go at that position (leave_one_out: the
    others' mean), divided as group_advantages divides (by the std of the step's, or the group's, total rewards).
    Rewards only at each response's last token give group_advantages(totals) at every token."""
    r = rewards * mask
    to_go = r.flip(1).cumsum(1).flip(1)                                          # sum_{u >= t} r_u
    g = to_go.view(-1, group_size, to_go.shape[1])
    adv = (g - g.mean(dim=1, keepdim=True)) * (group_size / (group_size - 1) if leave_one_out else 1.0)
    totals = to_go[:, 0]
    if scale == "group":
        adv = adv / (totals.view(-1, group_size).std(dim=1)[:, None, None] + eps)
    elif scale == "batch":
        adv = adv / (totals.std() + eps)
    return adv.reshape(to_go.shape) * mask


def k3_kl(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """Per-token k3 estimate of KL(pi || pi_ref) (Schulman, http://joschu.net/blog/kl-approx.html): >= 0, unbiased."""
    d = ref_logprobs - logprobs
    return d.exp() - d - 1


def token_mean(x: Tensor, mask: Tensor, loss_type: str, max_len: int) -> Tensor:
    """Average of per-token values x (b, t) over real tokens, as `loss_type` says (module docstring)."""
    mask = mask.float()
    if loss_type == "sequence":
        return ((x * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()
    if loss_type == "token":
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum() / (mask.shape[0] * max_len)


def clipped_surrogate(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, clip_low: float,
                      clip_high: float) -> tuple[Tensor, Tensor]:
    """Per-token -min(ratio * A, clip(ratio, 1 - low, 1 + high) * A) (b, t) for sequence advantages A (b,) or
    per-token ones (b, t); and which tokens were clipped."""
    ratio = (logprobs - old_logprobs).exp()
    adv = advantages[:, None] if advantages.dim() == 1 else advantages
    unclipped, clipped = -adv * ratio, -adv * ratio.clamp(1 - clip_low, 1 + clip_high)
    return torch.maximum(unclipped, clipped), (clipped > unclipped)

# ---------------------------------------------------------------------------------------------------- trainer


class GroupTrainer(OnlineRLTrainer):
    """Sample G responses per prompt, score them, advantages from the group, clipped-ratio updates; no critic.
    `leave_one_out` and `kl_in_reward` say which algorithm it is (GRPO: False, False; RLOO: True, True)."""
    leave_one_out = kl_in_reward = False
    progress_keys = ("rm_score", "kl", "gold_score")

    def __init__(self, policy: Policy, reward_model, prompts=None, config: GroupConfig | None = None, *,
                 gold_fn: Judge | None = None, accelerator=None, metadata=None):
        super().__init__(policy, reward_model, prompts, config, gold_fn=gold_fn, accelerator=accelerator,
                         metadata=metadata)
        if self.config.dense_reward:
            require_summed(reward_model)
        self.reward_model = reward_model

    @torch.no_grad()
    def rollout(self, prompts: list[Tensor]) -> dict:
        cfg, acc = self.config, self.accelerator
        gen = sample(self.ac, prompts, cfg, self._generator("rollout", self.global_step), n=cfg.group_size,
                     device=acc.device)
        p, mask = gen.prompt.shape[1], gen.mask
        if cfg.dense_reward:
            seq, seq_mask = gen.sequences()
            per_token, scores = self.reward_model.token_scores(seq, seq_mask, torch.cat(
                (torch.zeros_like(gen.prompt_mask), mask), dim=1))
            per_token = per_token[:, p:].float()                     # (b, t): the response tokens' own scores
        else:
            scores, seq, seq_mask = score(self.reward_fn, gen)
        old, ref = [], []
        for i in torch.arange(len(seq), device=seq.device).split(cfg.minibatch_size):  # the first pass's grouping
            with acc.autocast():
                old.append(response_logprobs(self.model(seq[i], seq_mask[i]), seq[i], p, cfg.temperature)[0])
                ref.append(response_logprobs(self.ac.reference_logits(seq[i], seq_mask[i]), seq[i], p,
                                             cfg.temperature)[0])
        old, ref = torch.cat(old).float(), torch.cat(ref).float()
        seq_kl = ((old - ref) * mask).sum(1)                                      # k1, per response
        s = scores.float()
        s, self.clipped_share = clip_rewards(s, cfg.reward_clip, first=self.global_step == 0)
        rewards = s - cfg.kl_coef * seq_kl if self.kl_in_reward else s
        if cfg.dense_reward:   # the rest of each score (bias; any clipping) at the last token, KL per token for RLOO
            token_rewards = per_token * mask
            last = mask.long().sum(dim=1) - 1
            token_rewards[torch.arange(len(s), device=s.device), last] += s - token_rewards.sum(dim=1)
            if self.kl_in_reward:
                token_rewards = token_rewards - cfg.kl_coef * (old - ref) * mask
            advantages = dense_group_advantages(token_rewards, mask.float(), cfg.group_size,
                                                leave_one_out=self.leave_one_out, scale=cfg.scale_rewards)
        else:
            advantages = group_advantages(rewards, cfg.group_size, leave_one_out=self.leave_one_out,
                                          scale=cfg.scale_rewards)
        return {"sequences": seq, "mask": seq_mask, "prompt_len": p, "action_mask": mask, "logprobs": old * mask,
                "ref_logprobs": ref * mask, "advantages": advantages, "scores": scores.float(), "seq_kl": seq_kl}

    def minibatch_loss(self, memory: dict, idx: Tensor) -> tuple[Tensor, dict]:
        cfg, p = self.config, memory["prompt_len"]
        mask = memory["action_mask"][idx]
        with self.accelerator.autocast():
            lp = response_logprobs(self.model(memory["sequences"][idx], memory["mask"][idx]),
                                   memory["sequences"][idx], p, cfg.temperature)[0].float()
        per_token, clipped = clipped_surrogate(lp, memory["logprobs"][idx], memory["advantages"][idx],
                                               cfg.clip_low, cfg.clip_high)
        kl = k3_kl(lp, memory["ref_logprobs"][idx])
        loss = token_mean(per_token, mask, cfg.loss_type, cfg.max_new_tokens)
        if not self.kl_in_reward and cfg.kl_coef > 0:
            loss = loss + cfg.kl_coef * token_mean(kl, mask, cfg.loss_type, cfg.max_new_tokens)
        ratio = (lp - memory["logprobs"][idx]).exp()[mask]
        m = mask.float()
        return loss, {"policy_loss": loss.detach(), "clip_frac": (clipped.float() * m).sum() / m.sum(),
                      "k3_kl": (kl.detach() * m).sum(1).mean(), "ratio_max_dev": (ratio.detach() - 1).abs().max()}

    def learn(self, memory: dict) -> dict:
        cfg, acc = self.config, self.accelerator
        self.ac.train()
        stats, first = {}, None
        b = len(memory["sequences"])
        for epoch in range(cfg.epochs):
            order = torch.randperm(b, generator=self._generator("order", self.global_step, epoch)) if epoch else \
                torch.arange(b)   # the first pass in the rollout's grouping: its ratios start at exactly 1
            for idx in order.to(memory["sequences"].device).split(cfg.minibatch_size):
                loss, parts = self.minibatch_loss(memory, idx)
                first = parts["ratio_max_dev"].item() if first is None else first
                acc.backward(loss)
                grad_norm = clip_gradients(acc, self.params, cfg.max_grad_norm)
                if self.update_is_finite(loss.item(), grad_norm, self.global_step):
                    self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                for k, v in parts.items():
                    stats.setdefault(k, []).append(v.item())
        out = {k: sum(v) / len(v) for k, v in stats.items() if k != "ratio_max_dev"}
        return {**out, "first_ratio_max_dev": first}

    def step(self, prompts: list[Tensor]) -> dict:
        """One iteration on these prompts: G samples each, score, advantages, learn. Returns its statistics."""
        t0 = time.time()
        memory = self.rollout(prompts)
        t_rollout = time.time() - t0
        acc = self.accelerator
        kl = acc.reduce(memory["seq_kl"].mean().reshape(1), "mean").item()
        stats = {} if self.over_budget(kl) else self.learn(memory)
        self.global_step += 1
        elapsed = time.time() - t0
        n = len(memory["sequences"]) * acc.num_processes
        groups = memory["scores"].view(-1, self.config.group_size)
        out = {"rm_score": acc.reduce(memory["scores"].mean().reshape(1), "mean").item(), "kl": kl,
               "flat_groups": (groups.std(dim=1) == 0).float().mean().item(),   # groups that teach nothing
               "rewards_clipped": self.clipped_share,
               "samples_per_s": n / elapsed, "rollout_s": t_rollout, "learn_s": elapsed - t_rollout, **stats}
        if exists(self.gold_fn):
            out["gold_score"] = judge_texts(self.gold_fn, memory["sequences"][:, memory["prompt_len"]:],
                                            memory["action_mask"]).mean().item()
        return out

    def plot(self, path):
        panels = {"reward": {"rollouts": self.log.series("rm_score")},
                  "KL to reference (nats/response)": {"rollouts": self.log.series("kl")},
                  "groups with equal rewards": {"rollouts": self.log.series("flat_groups")}}
        return save_plot(path, {**panels, **gold_panels(self.log, self.before)}, title=self.stage.upper())


class GRPOTrainer(GroupTrainer):
    """GRPO: group-mean baseline, k3 KL in the loss."""
    stage = "grpo"

    def __init__(self, policy: Policy, reward_model, prompts=None, config: GRPOConfig | None = None, **kw):
        super().__init__(policy, reward_model, prompts, config if exists(config) else GRPOConfig(), **kw)


class RLOOTrainer(GroupTrainer):
    """RLOO: leave-one-out baseline, k1 sequence KL folded into the reward."""
    stage = "rloo"
    leave_one_out = kl_in_reward = True

    def __init__(self, policy: Policy, reward_model, prompts=None, config: RLOOConfig | None = None, **kw):
        super().__init__(policy, reward_model, prompts, config if exists(config) else RLOOConfig(), **kw)
