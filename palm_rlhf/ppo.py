"""RLHF with PPO, as InstructGPT does it (https://arxiv.org/abs/2203.02155, building on Ziegler et al. 2019,
https://arxiv.org/abs/1909.08593, and PPO, https://arxiv.org/abs/1707.06347; GAE, https://arxiv.org/abs/1506.02438).

Per step (one iteration):
1. Rollout: sample responses for a batch of prompts at once with the KV-cached sampler (rollout.py).
2. Score: the frozen reward model scores each response at its last real token; the frozen *reference* policy
   (the same weights with the actor's LoRA switched off, or a frozen copy when fine-tuning fully) gives per-token
   log-probs. Per-token reward r_t = -kl_coef * (log pi(a_t) - log pi_ref(a_t)), plus the clipped (optionally
   normalised) reward-model score on the last real token.
3. GAE (gamma, lambda) over response tokens only, advantages whitened over real tokens.
4. Learn: PPO epochs over shuffled minibatches; clipped surrogate, clipped value loss, optional entropy bonus,
   gradient clipping, optional early stop on approximate KL. kl_coef follows an adaptive controller or stays fixed.

    trainer = PPOTrainer(ActorCritic(palm), RewardModel.load("checkpoints/reward/model"), prompts, PPOConfig())
    trainer.train()     # before/after table on held-out prompts, checkpoints, CHECKPOINT_DIR/model = the policy

The memory holds O(sequence) tensors per sample (tokens, masks, log-probs, values, rewards, advantages), never
O(sequence x vocabulary). Responses are sampled at the configured temperature, without top-k / top-p (rollout.py
says why), so the log-probs the ratio and the KL use are those of the distribution actually sampled from.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from .config import RunConfig
from .metrics import save_plot
from .policy import ActorCritic
from .judges import Judge, judge_texts
from .rollout import (OnlineRLTrainer, clip_rewards, entropy, gold_panels, require_summed, response_logprobs, sample,
                      score)
from .training import clip_gradients
from .utils import exists, masked_mean, masked_whiten, option, require


@dataclass
class PPOConfig(RunConfig):
    steps: int = 100
    lr: float = 5e-4
    betas: tuple[float, float] = (0.9, 0.999)
    checkpoint_interval: int = 10
    checkpoint_dir: str = "checkpoints/ppo"
    prompts_per_iter: int = option(16, "prompts rolled out per step, per process")
    max_new_tokens: int = option(64, "response length")
    temperature: float = option(1.0, "sampling temperature of the rollouts (> 0)")
    top_k: int | None = option(None, "refused (see __post_init__)", hidden=True)
    top_p: float | None = option(None, "refused (see __post_init__)", hidden=True)
    eos_token: int | None = option(None, "token that ends a response (none: always max_new_tokens)")
    kl_coef: float = option(0.05, "initial coefficient of the per-token KL penalty (beta)")
    adaptive_kl: bool = option(True, "adapt kl_coef toward target_kl (Ziegler et al.); off: fixed")
    target_kl: float = option(6.0, "target KL to the reference, nats per response")
    kl_horizon: int = option(10000, "horizon of the adaptive KL controller, in samples")
    kl_budget: float = option(0.0, "end the run at the first step whose rollouts' KL to the reference passes this "
                                   "(nats per response), before learning from them (0 = off)")
    gamma: float = option(1.0, "GAE discount")
    lam: float = option(0.95, "GAE lambda")
    ppo_epochs: int = option(4, "passes over each step's rollouts")
    minibatch_size: int = option(8, "rollouts per learning minibatch")
    clip_ratio: float = option(0.2, "PPO policy clip range")
    clip_value: float = option(0.2, "value clip range")
    value_coef: float = option(0.1, "weight of the value loss")
    entropy_coef: float = option(0.0, "weight of the entropy bonus")
    reward_clip: float = option(10.0, "clip rewards to +-this, after --normalize-reward when it is on (0 = off); "
                                      "a run whose first rewards are mostly outside it stops with the fix")
    normalize_reward: bool = option(False, "normalise scores by their running mean and std")
    dense_reward: bool = option(False, "with a summed reward model (pool sum): each response token's own score is its "
                                       "reward, instead of the whole score at the last token (the same total, "
                                       "credited to the tokens that earned it)")
    whiten_advantages: bool = option(True, "whiten advantages over each step's real tokens")
    early_stop_kl: float = option(0.0, "stop a step's epochs when a minibatch's approximate KL exceeds this (0 = off)")
    critic_from_reward: bool = option(False, "initialise the value head (and adapter) from the reward model, as "
                                             "InstructGPT does")
    eval_prompts: int = option(256, "held-out prompts for the before/after table")
    best_of: int = option(8, "N of the best-of-N baseline in the table (0 or 1 = skip)")

    def __post_init__(self):
        super().__post_init__()
        for name in ("top_k", "top_p"):
            require(getattr(self, name) is None, self, name, "PPO samples from the full temperature-scaled "
                    "distribution: a top-k/top-p filter moves with the weights, so a sampled token can fall outside "
                    "it after an update (infinite ratio and KL). Leave it unset (TRL advises the same); use "
                    "top-k/top-p when sampling from the trained policy (train.py sample)")
        for name in ("prompts_per_iter", "max_new_tokens", "ppo_epochs", "minibatch_size", "kl_horizon"):
            require(getattr(self, name) >= 1, self, name, "must be >= 1")
        require(self.prompts_per_iter % self.minibatch_size == 0, self, "prompts_per_iter",
                f"must be a multiple of minibatch_size ({self.minibatch_size})")
        require(self.temperature > 0, self, "temperature", "must be > 0")
        require(0 <= self.gamma <= 1, self, "gamma", "must lie in [0, 1]")
        require(0 <= self.lam <= 1, self, "lam", "must lie in [0, 1]")
        require(self.target_kl > 0, self, "target_kl", "must be > 0")
        for name in ("reward_clip", "early_stop_kl", "kl_budget", "best_of"):
            require(getattr(self, name) >= 0, self, name, "must be >= 0 (0 = off)")
        require(self.eval_prompts >= 2, self, "eval_prompts", "the before/after table needs at least 2 held-out "
                "prompts (it reports a standard deviation over them); 64 or more give a usable estimate")

# ---------------------------------------------------------------------------------------------------- maths


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over right-padded rows: (b, t) rewards, values, mask -> advantages, returns.

    The value after a row's last real token is 0 (the episode ends there).
    """
    mask = mask.float()
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    n = rewards.shape[1]
    for t in reversed(range(n)):
        next_mask = mask[:, t + 1] if t + 1 < n else torch.zeros_like(last)
        next_value = values[:, t + 1] * next_mask if t + 1 < n else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * next_mask * last
        advantages[:, t] = last
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def policy_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, clip: float):
    """Clipped surrogate; returns loss, clip fraction, approximate KL (k3 estimator), ratio."""
    log_ratio = logprobs - old_logprobs
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip, 1 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clip_frac = masked_mean((clipped > unclipped).float(), mask)
    approx_kl = masked_mean((ratio - 1) - log_ratio, mask)
    return loss, clip_frac, approx_kl, ratio


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip: float):
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    loss = 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)
    clip_frac = masked_mean(((values - old_values).abs() > clip).float(), mask)
    return loss, clip_frac


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> float:
    m = mask.bool()
    var = returns[m].var()
    return float(1 - (returns[m] - values[m]).var() / var) if var > 0 else float("nan")


class AdaptiveKLController:
    """kl_coef <- kl_coef * (1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon)   (Ziegler et al. 2019)."""

    def __init__(self, kl_coef: float, target: float, horizon: int, adaptive: bool = True):
        self.kl_coef, self.target, self.horizon, self.adaptive = kl_coef, target, horizon, adaptive

    def update(self, kl: float, n: int) -> None:
        if self.adaptive:
            error = min(max(kl / self.target - 1, -0.2), 0.2)
            self.kl_coef *= 1 + error * n / self.horizon


class RunningMoments:
    """Running mean / std (Chan et al. parallel update) for reward normalisation."""

    def __init__(self):
        self.mean, self.var, self.count = 0.0, 1.0, 1e-4

    def update(self, x: Tensor) -> None:
        batch_mean, batch_var, n = x.mean().item(), x.var(unbiased=False).item(), x.numel()
        delta, total = batch_mean - self.mean, self.count + n
        self.mean += delta * n / total
        self.var = (self.var * self.count + batch_var * n + delta ** 2 * self.count * n / total) / total
        self.count = total

    @property
    def std(self) -> float:
        return math.sqrt(max(self.var, 1e-8))


@dataclass
class Memory:
    """One step's rollouts. (b, p + t) for whole sequences; every (b, t) tensor is aligned with the responses."""
    sequences: Tensor
    mask: Tensor            # (b, p + t) real tokens of the sequences
    prompt_len: int
    action_mask: Tensor     # (b, t) real response tokens: the actions
    logprobs: Tensor        # behaviour policy, recomputed by the learning forward pass (see rollout)
    sampler_logprobs: Tensor
    ref_logprobs: Tensor
    values: Tensor
    rewards: Tensor
    advantages: Tensor
    returns: Tensor
    scores: Tensor          # reward-model scores (b,)
    kl: Tensor              # per-token log pi - log pi_ref
    order: Tensor           # the first epoch's minibatch order (old log-probs were computed in this grouping)
    first_forward: tuple | None = None  # (logits, values) of that first minibatch, with autograd graph; see rollout

    def minibatch(self, idx: Tensor) -> dict:
        keys = ("sequences", "mask", "action_mask", "logprobs", "values", "advantages", "returns")
        return {k: getattr(self, k)[idx] for k in keys}

# ---------------------------------------------------------------------------------------------------- trainer


class PPOTrainer(OnlineRLTrainer):
    """Rollout + learn on an ActorCritic against a frozen reward model (a RewardModel, which may be a LoRA scope on
    the actor's own PaLM, or any function (tokens, mask, response_mask) -> scores), with accelerate (DDP).

    prompts: what training draws from, as data.prompt_sampler takes it (a list of strings or token tensors, or a
    (count, seed) -> prompts function such as windows of a corpus). gold_fn(text) -> float: a known judge, reported
    beside the reward model (the demo task's). step(prompts) runs one iteration on given prompts; the before/after
    table on held-out prompts comes from OnlineRLTrainer (rollout.py)."""
    stage = "ppo"
    progress_keys = ("rm_score", "kl", "kl_coef", "gold_score")

    def __init__(self, actor_critic: ActorCritic, reward_model, prompts=None, config: PPOConfig | None = None, *,
                 gold_fn: Judge | None = None, accelerator=None, metadata=None):
        config = config if exists(config) else PPOConfig()
        super().__init__(actor_critic, reward_model, prompts, config, gold_fn=gold_fn, accelerator=accelerator,
                         metadata=metadata)
        self.kl_ctl = AdaptiveKLController(config.kl_coef, config.target_kl, config.kl_horizon, config.adaptive_kl)
        self.reward_moments = RunningMoments()
        if config.dense_reward:
            require_summed(reward_model)
        self.reward_model = reward_model

    @torch.no_grad()
    def rollout(self, prompts: list[Tensor], keep_first_forward: bool = False) -> Memory:
        """Sample, score, and compute old log-probs, values, rewards and advantages.

        keep_first_forward: the first minibatch of the first epoch runs at exactly the weights the old log-probs are
        computed with, so its forward pass here is also the learning forward pass; keep its graph in the memory and
        `learn` skips recomputing it (step() does this; it saves one of the 1 + epochs x minibatches forwards).
        Policy switches the PaLM's dropout off, so this eval-mode pass equals a train-mode one.
        """
        cfg, acc = self.config, self.accelerator
        gen = sample(self.ac, prompts, cfg, self._generator("rollout", self.global_step), device=acc.device)
        p, action_mask = gen.prompt.shape[1], gen.mask
        if cfg.dense_reward:
            seq, seq_mask = gen.sequences()
            per_token, scores = self.reward_model.token_scores(seq, seq_mask, torch.cat(
                (torch.zeros_like(gen.prompt_mask), gen.mask), dim=1))
            per_token = per_token[:, p:]                                # (b, t): the response tokens' own scores
        else:
            scores, seq, seq_mask = score(self.reward_fn, gen)
        b, t = action_mask.shape
        order = torch.randperm(b, generator=self._generator("order", self.global_step, 0)).to(seq.device)
        logprobs, values = torch.zeros(b, t, device=seq.device), torch.zeros(b, t, device=seq.device)
        first_forward = None
        for n, idx in enumerate(order.split(cfg.minibatch_size)):  # the first epoch's grouping: ratios start at 1
            keep = keep_first_forward and n == 0
            with torch.set_grad_enabled(keep), acc.autocast():
                logits, v = self.model(seq[idx], seq_mask[idx])
            if keep:
                first_forward = (logits, v)
                logits, v = logits.detach(), v.detach()
            logprobs[idx] = response_logprobs(logits, seq[idx], p, cfg.temperature)[0].float()
            values[idx] = v[:, p - 1:-1].float()
        with acc.autocast():
            ref_lp = response_logprobs(self.ac.reference_logits(seq, seq_mask), seq, p, cfg.temperature)[0].float()
        fmask = action_mask.float()
        kl = (logprobs - ref_lp) * fmask
        s = scores.float()
        if cfg.normalize_reward:
            self.reward_moments.update(acc.gather(s))
            s = (s - self.reward_moments.mean) / self.reward_moments.std
        s, self.clipped_share = clip_rewards(s, cfg.reward_clip, first=self.global_step == 0)
        rewards = -self.kl_ctl.kl_coef * kl
        if cfg.dense_reward:  # each token its own score, in the same units as s; the rest (bias, mean) at the end
            dense = per_token * fmask / (self.reward_moments.std if cfg.normalize_reward else 1.0)
            rewards += dense
            s = s - dense.sum(dim=1)
        rewards[torch.arange(b, device=seq.device), action_mask.long().sum(dim=1) - 1] += s
        values = values * fmask
        advantages, returns = gae(rewards, values, action_mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            advantages = masked_whiten(advantages, action_mask)
        return Memory(seq, seq_mask, p, action_mask, logprobs * fmask, gen.logprobs, ref_lp * fmask, values,
                      rewards, advantages, returns, scores.float(), kl, order, first_forward)

    def minibatch_loss(self, memory: Memory, idx: Tensor) -> tuple[Tensor, tuple, Tensor]:
        """PPO loss of one minibatch -> loss, (policy loss, value loss, entropy, clip fractions, approx KL), ratios."""
        cfg, mb, p = self.config, memory.minibatch(idx), memory.prompt_len
        with self.accelerator.autocast():
            if exists(memory.first_forward):  # computed by the rollout at these same weights
                (logits, v), memory.first_forward = memory.first_forward, None
            else:
                logits, v = self.model(mb["sequences"], mb["mask"])
            lp, logp = response_logprobs(logits, mb["sequences"], p, cfg.temperature)
            pg, pg_clip, approx_kl, ratio = policy_loss(lp.float(), mb["logprobs"], mb["advantages"],
                                                        mb["action_mask"], cfg.clip_ratio)
            vf, vf_clip = value_loss(v[:, p - 1:-1].float(), mb["values"], mb["returns"], mb["action_mask"],
                                     cfg.clip_value)
            ent = entropy(logp.float(), mb["action_mask"])
            loss = pg + cfg.value_coef * vf - cfg.entropy_coef * ent
        return loss, (pg, vf, ent, pg_clip, vf_clip, approx_kl), ratio.detach()[mb["action_mask"]]

    def learn(self, memory: Memory) -> dict:
        cfg, acc = self.config, self.accelerator
        self.ac.train()
        stats = {k: [] for k in ("policy_loss", "value_loss", "entropy", "policy_clip_frac", "value_clip_frac",
                                 "approx_kl")}
        first_ratio, stop, epochs_run = None, False, 0
        b = memory.action_mask.shape[0]
        for epoch in range(cfg.ppo_epochs):
            order = memory.order if epoch == 0 else torch.randperm(
                b, generator=self._generator("order", self.global_step, epoch)).to(memory.action_mask.device)
            for idx in order.split(cfg.minibatch_size):
                loss, parts, ratio = self.minibatch_loss(memory, idx)
                first_ratio = ratio if first_ratio is None else first_ratio
                acc.backward(loss)
                grad_norm = clip_gradients(acc, self.params, cfg.max_grad_norm)
                if self.update_is_finite(loss.item(), grad_norm, self.global_step):
                    self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                for k, val in zip(stats, parts):
                    stats[k].append(val.item())
                if cfg.early_stop_kl > 0:
                    stop = acc.reduce(parts[-1].detach().reshape(1), reduction="mean").item() > cfg.early_stop_kl
                    if stop:
                        break
            epochs_run += 1
            if stop:
                break
        out = {k: sum(v) / len(v) for k, v in stats.items()}
        out.update(epochs_run=epochs_run, early_stopped=stop, first_ratio_max_dev=(first_ratio - 1).abs().max().item())
        return out

    def step(self, prompts: list[Tensor]) -> dict:
        """One PPO iteration on these prompts: rollout, learn, adapt kl_coef. Returns the iteration's statistics."""
        t0 = time.time()
        memory = self.rollout(prompts, keep_first_forward=True)
        t_rollout = time.time() - t0
        acc = self.accelerator
        seq_kl = acc.reduce(memory.kl.sum(1).mean().reshape(1), reduction="mean").item()
        stats = {} if self.over_budget(seq_kl) else self.learn(memory)
        m = memory.action_mask.float()
        n = len(prompts) * acc.num_processes
        kl_coef = self.kl_ctl.kl_coef
        self.kl_ctl.update(seq_kl, n)
        self.global_step += 1
        elapsed = time.time() - t0
        out = {"rm_score": acc.reduce(memory.scores.mean().reshape(1), "mean").item(), "kl": seq_kl,
               "kl_coef": kl_coef, "response_tokens": m.sum(1).mean().item(),
               "explained_variance": explained_variance(memory.values, memory.returns, memory.action_mask),
               "samples_per_s": n / elapsed, "tokens_per_s": acc.reduce(m.sum().reshape(1), "sum").item() / elapsed,
               "rollout_s": t_rollout, "learn_s": elapsed - t_rollout, "rewards_clipped": self.clipped_share, **stats}
        if exists(self.gold_fn):
            out["gold_score"] = judge_texts(self.gold_fn, memory.sequences[:, memory.prompt_len:],
                                      memory.action_mask).mean().item()
        return out

    def plot(self, path):
        return ppo_plot(path, self.log, self.before, self.config)

    def trainer_state(self) -> dict:
        m = self.reward_moments
        return {**super().trainer_state(), "kl_coef": self.kl_ctl.kl_coef, "reward_mean": m.mean, "reward_var": m.var,
                "reward_count": m.count}

    def load_trainer_state(self, state: dict) -> None:
        super().load_trainer_state(state)
        self.kl_ctl.kl_coef = state["kl_coef"]
        self.reward_moments.mean, self.reward_moments.var = state["reward_mean"], state["reward_var"]
        self.reward_moments.count = state["reward_count"]


def ppo_plot(path, log, before: dict, config: PPOConfig):
    """Reward-model score, KL (with its target) and, with a gold judge, the gold score with the reference's
    held-out level and that level plus one standard deviation."""
    steps = log.series("kl")[0]
    level = lambda value: (steps, [value] * len(steps))  # noqa: E731
    panels = {"reward-model score": {"rollouts": log.series("rm_score")},
              "KL to reference (nats/response)": {"rollouts": log.series("kl"), **(
                  {"target": level(config.target_kl)} if config.adaptive_kl else {})}}
    return save_plot(path, {**panels, **gold_panels(log, before)}, title="PPO")
