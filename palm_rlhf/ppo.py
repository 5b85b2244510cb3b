"""RLHF with PPO, as InstructGPT does it (https://arxiv.org/abs/2203.02155, building on Ziegler et al. 2019,
https://arxiv.org/abs/1909.08593, and PPO, https://arxiv.org/abs/1707.06347; GAE, https://arxiv.org/abs/1506.02438).

Per iteration:
1. Rollout: sample responses for a batch of prompts at once with the KV-cached sampler.
2. Score: the frozen reward model scores each response at its last real token; the frozen *reference* policy
   (the same weights with the actor's LoRA switched off, or a frozen copy when fine-tuning fully) gives per-token
   log-probs. Per-token reward r_t = -beta * (log pi(a_t) - log pi_ref(a_t)), plus the clipped (optionally
   normalised) reward-model score on the last real token.
3. GAE (gamma, lambda) over response tokens only, advantages whitened over real tokens.
4. Learn: PPO epochs over shuffled minibatches; clipped surrogate, clipped value loss, optional entropy bonus,
   gradient clipping, optional early stop on approximate KL. beta follows an adaptive controller or stays fixed.

The memory holds O(sequence) tensors per sample (tokens, masks, log-probs, values, rewards, advantages), never
O(sequence x vocabulary). Log-probs are always those of the distribution sampled from (temperature, and top-k /
top-p when set: the importance ratio uses that filtered distribution; the KL penalty compares actor and reference
under temperature only, since filtering would make it infinite wherever the reference filters the sampled token).
"""

from __future__ import annotations

import copy
import hashlib
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .lora import add_lora, lora_parameters, use_lora
from .palm import PaLM
from .reward import RewardModel
from .sampling import generate, process_logits
from .utils import exists, masked_mean, masked_whiten


@dataclass
class PPOConfig:
    prompts_per_iter: int = 16
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    eos_token: int | None = None
    kl_coef: float = 0.05            # initial beta
    adaptive_kl: bool = True
    target_kl: float = 6.0           # nats per response (Ziegler et al.)
    kl_horizon: int = 10000
    gamma: float = 1.0
    lam: float = 0.95
    ppo_epochs: int = 4
    minibatch_size: int = 8
    clip_ratio: float = 0.2
    clip_value: float = 0.2
    value_coef: float = 0.1
    entropy_coef: float = 0.0
    max_grad_norm: float | None = 1.0   # None or 0: no clipping
    reward_clip: float | None = 10.0    # None or 0: no clipping
    normalize_reward: bool = False   # running mean/std of reward-model scores
    whiten_advantages: bool = True
    early_stop_kl: float | None = None  # stop the epochs when a minibatch's approximate KL exceeds this (0: off)

    def __post_init__(self):
        if self.prompts_per_iter % self.minibatch_size != 0:
            raise ValueError(f"prompts_per_iter ({self.prompts_per_iter}) must be a multiple of minibatch_size "
                             f"({self.minibatch_size})")
        if not 0 <= self.lam <= 1 or not 0 <= self.gamma <= 1:
            raise ValueError("gamma and lam must lie in [0, 1]")


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
    """beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon)   (Ziegler et al. 2019)."""

    def __init__(self, beta: float, target: float, horizon: int, adaptive: bool = True):
        self.beta, self.target, self.horizon, self.adaptive = beta, target, horizon, adaptive

    def update(self, kl: float, n: int) -> None:
        if self.adaptive:
            error = min(max(kl / self.target - 1, -0.2), 0.2)
            self.beta *= 1 + error * n / self.horizon


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

# ---------------------------------------------------------------------------------------------------- models


class ActorCritic(nn.Module):
    """Actor, critic and reference on one base PaLM.

    LoRA (lora_r > 0): the base weights are frozen and shared; the actor and the critic are two LoRA scopes, the
    reference policy is the base with both switched off (no second copy). Full fine-tuning (lora_r = 0): the actor
    is the PaLM itself, the critic trunk a trainable copy, the reference a frozen copy.
    forward() runs actor and critic in one call, so DDP sees one forward per backward.
    """

    def __init__(self, palm: PaLM, *, lora_r: int = 8, lora_alpha: float = 16.0):
        super().__init__()
        self.palm = palm
        self.lora = lora_r > 0
        if self.lora:
            add_lora(palm, "actor", r=lora_r, alpha=lora_alpha)
            add_lora(palm, "critic", r=lora_r, alpha=lora_alpha)
            for p in palm.parameters():
                p.requires_grad_(False)
            for p in lora_parameters(palm, "actor") + lora_parameters(palm, "critic"):
                p.requires_grad_(True)
            self.critic_trunk, self.reference = None, None
        else:
            self.critic_trunk = copy.deepcopy(palm)
            self.reference = copy.deepcopy(palm).requires_grad_(False)
        self.value_head = nn.Linear(palm.config.dim, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def init_critic_from_reward(self, rm: RewardModel) -> None:
        """InstructGPT initialises the value function from the reward model: copy its head (and, when the reward
        model is a LoRA scope on the same base architecture, its adapter into the critic's)."""
        with torch.no_grad():
            self.value_head.weight.copy_(rm.head.weight[:1])
            self.value_head.bias.copy_(rm.head.bias[:1])
            if self.lora and rm.scope:
                for mine, theirs in zip(self.palm.modules(), rm.palm.modules()):
                    if hasattr(mine, "lora_A") and "critic" in mine.lora_A and rm.scope in theirs.lora_A:
                        if mine.lora_A["critic"].shape == theirs.lora_A[rm.scope].shape:
                            mine.lora_A["critic"].copy_(theirs.lora_A[rm.scope])
                            mine.lora_B["critic"].copy_(theirs.lora_B[rm.scope])

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def actor_logits(self, tokens: Tensor, mask: Tensor) -> Tensor:
        if self.lora:
            with use_lora(self.palm, "actor"):
                return self.palm(tokens, mask=mask)
        return self.palm(tokens, mask=mask)

    @torch.no_grad()
    def reference_logits(self, tokens: Tensor, mask: Tensor) -> Tensor:
        if self.lora:
            with use_lora(self.palm):
                return self.palm(tokens, mask=mask)
        return self.reference(tokens, mask=mask)

    def values(self, tokens: Tensor, mask: Tensor) -> Tensor:
        if self.lora:
            with use_lora(self.palm, "critic"):
                hidden = self.palm(tokens, mask=mask, return_hidden=True)
        else:
            hidden = self.critic_trunk(tokens, mask=mask, return_hidden=True)
        return self.value_head(hidden).squeeze(-1)

    def forward(self, tokens: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        return self.actor_logits(tokens, mask), self.values(tokens, mask)

    def generation_context(self):
        """Context in which self.palm samples from the actor."""
        return use_lora(self.palm, "actor") if self.lora else use_lora(self.palm)

# ---------------------------------------------------------------------------------------------------- memory


@dataclass
class Memory:
    """One iteration's rollouts: everything is (b, t) over response tokens, or (b, p + t) for sequences."""
    sequences: Tensor
    sequence_mask: Tensor
    prompt_len: int
    mask: Tensor            # real response tokens
    logprobs: Tensor        # behaviour policy, recomputed by the learning forward pass (see rollout)
    sampler_logprobs: Tensor
    ref_logprobs: Tensor
    values: Tensor
    rewards: Tensor
    advantages: Tensor
    returns: Tensor
    scores: Tensor          # reward-model scores (b,)
    kl: Tensor              # per-token log pi - log pi_ref (temperature-scaled, unfiltered)
    order: Tensor           # the first epoch's minibatch order (old log-probs were computed in this grouping)
    first_forward: tuple | None = None  # (logits, values) of that first minibatch, with autograd graph; see rollout

    def minibatch(self, idx: Tensor) -> dict:
        keys = ("sequences", "sequence_mask", "mask", "logprobs", "values", "advantages", "returns")
        return {k: getattr(self, k)[idx] for k in keys}


def response_logprobs(logits: Tensor, sequences: Tensor, prompt_len: int, cfg: PPOConfig, filtered: bool = True):
    """log-probs (b, t) of the response tokens and the processed log-distribution (b, t, v) they came from."""
    logits = logits[:, prompt_len - 1:-1]
    if filtered:
        logp = process_logits(logits, cfg.temperature, cfg.top_k, cfg.top_p)
    else:
        logp = process_logits(logits, cfg.temperature)
    tokens = sequences[:, prompt_len:]
    return logp.gather(-1, tokens[..., None]).squeeze(-1), logp


def entropy(logp: Tensor, mask: Tensor) -> Tensor:
    p = logp.exp()
    ent = -(p * torch.where(p > 0, logp, torch.zeros_like(logp))).sum(-1)
    return masked_mean(ent, mask)


# ---------------------------------------------------------------------------------------------------- trainer


class PPOTrainer:
    """Rollout + learn on an ActorCritic against a frozen RewardModel, with accelerate (DDP across processes)."""

    def __init__(self, actor_critic: ActorCritic, reward_model: RewardModel, cfg: PPOConfig, *, accelerator,
                 lr: float = 1e-4, seed: int = 0, gold_fn=None):
        self.cfg, self.accelerator, self.seed, self.gold_fn = cfg, accelerator, seed, gold_fn
        if isinstance(reward_model, nn.Module):
            reward_model = reward_model.to(accelerator.device).eval().requires_grad_(False)
        # a RewardModel, or any function (tokens, mask, response_mask) -> (b,) scores, e.g. a programmatic reward
        self.reward_fn = reward_model.score if isinstance(reward_model, RewardModel) else reward_model
        params = actor_critic.trainable_parameters()
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        self.model, self.optimizer = accelerator.prepare(actor_critic, optimizer)
        self.ac = accelerator.unwrap_model(self.model)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.kl_ctl = AdaptiveKLController(cfg.kl_coef, cfg.target_kl, cfg.kl_horizon, cfg.adaptive_kl)
        self.reward_moments = RunningMoments()
        self.iteration = 0

    def _generator(self, *parts) -> torch.Generator:
        """A generator that depends only on (seed, rank, parts): rollouts and shuffles survive resumption."""
        key = repr((self.seed, self.accelerator.process_index) + parts).encode()
        return torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(key).digest()[:7], "little"))

    def sample(self, prompts: list[Tensor], generator: torch.Generator, actor: bool = True, n: int = 1):
        """Generate from the actor (or the reference policy) for each prompt, n times each."""
        self.ac.eval()
        device = self.accelerator.device
        prompts = [p.to(device) for p in prompts for _ in range(n)]
        if actor:
            model, context = self.ac.palm, self.ac.generation_context()
        elif self.ac.lora:
            model, context = self.ac.palm, use_lora(self.ac.palm)   # adapters off: the reference policy
        else:
            model, context = self.ac.reference, nullcontext()
        with context:
            gen_device = torch.Generator(device=device).manual_seed(int(torch.randint(2 ** 62, (1,), generator=generator)))
            return generate(model, prompts, self.cfg.max_new_tokens, temperature=self.cfg.temperature,
                            top_k=self.cfg.top_k, top_p=self.cfg.top_p, eos_token=self.cfg.eos_token,
                            generator=gen_device)

    @torch.no_grad()
    def score(self, gen) -> tuple[Tensor, Tensor, Tensor]:
        """Reward-model scores (b,), sequences and sequence mask of a Generation."""
        seq, seq_mask = gen.sequences()
        response = torch.cat((torch.zeros_like(gen.prompt_mask), gen.mask), dim=1)
        return self.reward_fn(seq, seq_mask, response), seq, seq_mask

    @torch.no_grad()
    def rollout(self, prompts: list[Tensor], keep_first_forward: bool = False) -> Memory:
        """Sample, score, and compute old log-probs, values, rewards and advantages.

        keep_first_forward: the first minibatch of the first epoch runs at exactly the weights the old log-probs are
        computed with, so its forward pass here is also the learning forward pass; keep its graph in the memory and
        `learn` skips recomputing it (step() does this; it saves one of the 1 + epochs x minibatches forwards).
        The model has no dropout, so this eval-mode pass equals a train-mode one; a fork that adds dropout should
        switch the model to train mode for it.
        """
        cfg = self.cfg
        gen = self.sample(prompts, self._generator("rollout", self.iteration))
        scores, seq, seq_mask = self.score(gen)
        p, mask = gen.prompt.shape[1], gen.mask
        b, t = mask.shape
        order = torch.randperm(b, generator=self._generator("order", self.iteration, 0)).to(seq.device)
        logprobs, values, actor_lp = (torch.zeros(b, t, device=seq.device) for _ in range(3))
        first_forward = None
        for n, idx in enumerate(order.split(cfg.minibatch_size)):  # the first epoch's grouping: ratios start at 1
            keep = keep_first_forward and n == 0
            with torch.set_grad_enabled(keep), self.accelerator.autocast():
                logits, v = self.model(seq[idx], seq_mask[idx])
            if keep:
                first_forward = (logits, v)
                logits, v = logits.detach(), v.detach()
            logprobs[idx] = response_logprobs(logits, seq[idx], p, cfg)[0].float()
            # the KL penalty uses the unfiltered distribution; without top-k / top-p the two are the same
            actor_lp[idx] = response_logprobs(logits, seq[idx], p, cfg, filtered=False)[0].float() \
                if exists(cfg.top_k) or exists(cfg.top_p) else logprobs[idx]
            values[idx] = v[:, p - 1:-1].float()
        with self.accelerator.autocast():
            ref_lp = response_logprobs(self.ac.reference_logits(seq, seq_mask), seq, p, cfg, filtered=False)[0]
        fmask = mask.float()
        kl = (actor_lp - ref_lp.float()) * fmask
        s = scores.float()
        if cfg.normalize_reward:
            self.reward_moments.update(self.accelerator.gather(s))
            s = (s - self.reward_moments.mean) / self.reward_moments.std
        if exists(cfg.reward_clip) and cfg.reward_clip > 0:
            s = s.clamp(-cfg.reward_clip, cfg.reward_clip)
        rewards = -self.kl_ctl.beta * kl
        last = mask.long().sum(dim=1) - 1
        rewards[torch.arange(b, device=seq.device), last] += s
        values = values * fmask
        advantages, returns = gae(rewards, values, mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            advantages = masked_whiten(advantages, mask)
        return Memory(seq, seq_mask, p, mask, logprobs * fmask, gen.logprobs, ref_lp.float() * fmask, values,
                      rewards, advantages, returns, scores.float(), kl, order, first_forward)

    def learn(self, memory: Memory) -> dict:
        cfg, acc = self.cfg, self.accelerator
        self.ac.train()
        stats = {k: [] for k in ("policy_loss", "value_loss", "entropy", "policy_clip_frac", "value_clip_frac",
                                 "approx_kl")}
        first_ratio, stop, epochs_run = None, False, 0
        b, p = memory.mask.shape[0], memory.prompt_len
        for epoch in range(cfg.ppo_epochs):
            order = memory.order if epoch == 0 else torch.randperm(
                b, generator=self._generator("order", self.iteration, epoch)).to(memory.mask.device)
            for idx in order.split(cfg.minibatch_size):
                mb = memory.minibatch(idx)
                with acc.autocast():
                    if exists(memory.first_forward):  # computed by the rollout at these same weights
                        (logits, v), memory.first_forward = memory.first_forward, None
                    else:
                        logits, v = self.model(mb["sequences"], mb["sequence_mask"])
                    lp, logp = response_logprobs(logits, mb["sequences"], p, cfg)
                    v = v[:, p - 1:-1].float()
                    pg, pg_clip, approx_kl, ratio = policy_loss(lp.float(), mb["logprobs"], mb["advantages"],
                                                                mb["mask"], cfg.clip_ratio)
                    vf, vf_clip = value_loss(v, mb["values"], mb["returns"], mb["mask"], cfg.clip_value)
                    ent = entropy(logp.float(), mb["mask"])
                    loss = pg + cfg.value_coef * vf - cfg.entropy_coef * ent
                if first_ratio is None:
                    first_ratio = ratio.detach()[mb["mask"]]
                acc.backward(loss)
                if exists(cfg.max_grad_norm) and cfg.max_grad_norm > 0:
                    acc.clip_grad_norm_(self.params, cfg.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                for k, val in zip(stats, (pg, vf, ent, pg_clip, vf_clip, approx_kl)):
                    stats[k].append(val.item())
                if exists(cfg.early_stop_kl) and cfg.early_stop_kl > 0:
                    kl_all = acc.reduce(approx_kl.detach().reshape(1), reduction="mean").item()
                    stop = kl_all > cfg.early_stop_kl
                    if stop:
                        break
            epochs_run += 1
            if stop:
                break
        out = {k: sum(v) / len(v) for k, v in stats.items()}
        out.update(epochs_run=epochs_run, early_stopped=stop, first_ratio_max_dev=(first_ratio - 1).abs().max().item())
        return out

    def step(self, prompts: list[Tensor]) -> dict:
        """One PPO iteration: rollout, learn, adapt beta. Returns the iteration's statistics."""
        t0 = time.time()
        memory = self.rollout(prompts, keep_first_forward=True)
        t_rollout = time.time() - t0
        stats = self.learn(memory)
        acc = self.accelerator
        m = memory.mask.float()
        seq_kl = acc.reduce(memory.kl.sum(1).mean().reshape(1), reduction="mean").item()
        n = len(prompts) * acc.num_processes
        beta = self.kl_ctl.beta
        self.kl_ctl.update(seq_kl, n)
        self.iteration += 1
        elapsed = time.time() - t0
        out = {
            "iteration": self.iteration, "rm_score": acc.reduce(memory.scores.mean().reshape(1), "mean").item(),
            "kl": seq_kl, "beta": beta, "response_tokens": m.sum(1).mean().item(),
            "explained_variance": explained_variance(memory.values, memory.returns, memory.mask),
            "samples_per_s": n / elapsed, "tokens_per_s": acc.reduce(m.sum().reshape(1), "sum").item() / elapsed,
            "rollout_s": t_rollout, "learn_s": elapsed - t_rollout, **stats,
        }
        if exists(self.gold_fn):
            out["gold_score"] = self.gold_fn(memory.sequences[:, memory.prompt_len:], memory.mask).mean().item()
        return out

    @torch.no_grad()
    def evaluate(self, prompts: list[Tensor], *, actor: bool = True, best_of: int = 1, seed: int = 0) -> dict:
        """Mean RM score, gold score and KL to the reference of samples from the actor or the reference policy;
        best_of > 1: sample that many per prompt from the policy and keep the one the reward model likes best."""
        gen = self.sample(prompts, self._generator("eval", seed, actor, best_of), actor=actor, n=best_of)
        scores, seq, seq_mask = self.score(gen)
        pick = scores.view(len(prompts), best_of).argmax(dim=1) + torch.arange(len(prompts), device=seq.device) * best_of
        p = gen.prompt.shape[1]
        out = {"rm_score": scores[pick].mean().item(), "rm_score_std": scores[pick].std().item() if len(pick) > 1 else 0.0}
        if exists(self.gold_fn):
            gold = self.gold_fn(gen.tokens[pick], gen.mask[pick])
            out.update(gold_score=gold.mean().item(), gold_score_std=gold.std().item() if len(pick) > 1 else 0.0,
                       gold_per_prompt=gold.tolist())
        if best_of == 1 and not actor:
            out["kl"] = 0.0  # samples of the reference policy itself
        elif best_of == 1:
            with self.accelerator.autocast():
                actor_lp = response_logprobs(self.ac.actor_logits(seq, seq_mask), seq, p, self.cfg, False)[0]
                ref_lp = response_logprobs(self.ac.reference_logits(seq, seq_mask), seq, p, self.cfg, False)[0]
            out["kl"] = ((actor_lp.float() - ref_lp.float()) * gen.mask).sum(1).mean().item()
        else:
            out["kl_bound"] = math.log(best_of) - (best_of - 1) / best_of  # analytic KL of best-of-N
        return out

    def state_dict(self) -> dict:
        return {"beta": self.kl_ctl.beta, "iteration": self.iteration, "reward_mean": self.reward_moments.mean,
                "reward_var": self.reward_moments.var, "reward_count": self.reward_moments.count}

    def load_state_dict(self, state: dict) -> None:
        self.kl_ctl.beta, self.iteration = state["beta"], state["iteration"]
        self.reward_moments.mean, self.reward_moments.var = state["reward_mean"], state["reward_var"]
        self.reward_moments.count = state["reward_count"]
