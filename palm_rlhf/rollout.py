"""The rollout seam every online RL algorithm here shares (PPO today; critic-free methods sample and score the same
way): sample responses from the actor or the reference policy with the KV-cached sampler, score them with a reward
model or any reward function, take per-token log-probs under the distribution sampled from, and evaluate a policy
on held-out prompts (reward, gold judge, KL to the reference, best-of-N). `OnlineRLTrainer` is the trainer these
algorithms share: a frozen reward, prompts, repeatable draws, and the before/after table on held-out prompts.

Sampling is from the temperature-scaled distribution only. Top-k / top-p would make the behaviour policy a filtered
distribution whose support moves with the weights: a token sampled inside the filter can fall outside it after one
update (log-prob -inf, KL and ratio infinite). PPOConfig refuses them, as TRL advises for its PPO trainer.
"""

from __future__ import annotations

import hashlib
import math
from contextlib import nullcontext

import torch
from torch import Tensor, nn

from .data import prompt_sampler
from .fsdp import gathered
from .judges import Judge, RewardFn, judge_texts
from .palm import PaLM
from .policy import Policy
from .reward import RewardModel
from .sampling import Generation, generate, process_logits
from .training import Trainer, step_seed
from .utils import exists, masked_mean

def reward_function(reward_model) -> RewardFn:
    """A RewardModel's deterministic score, or any function (tokens, mask, response_mask) -> (b,) scores."""
    return reward_model.score if isinstance(reward_model, RewardModel) else reward_model


def freeze_reward_model(reward_model, actor_critic: Policy, device) -> RewardFn:
    """Freeze what belongs to the reward model alone and return its reward function.

    The reward model may share its PaLM with the actor-critic when both are LoRA scopes on it (one base, four roles,
    one copy of the weights); anything else that would freeze the policy's parameters, or let PPO move the reward
    model's base, is refused here instead of training silently wrong."""
    if not isinstance(reward_model, nn.Module):
        return reward_model
    if isinstance(reward_model, RewardModel) and reward_model.palm is actor_critic.palm:
        if not (reward_model.scope and actor_critic.lora):
            raise ValueError(
                "the reward model and the actor-critic share one PaLM, which works only when both use LoRA (the "
                "shared base stays frozen): build both with a LoRAConfig of r > 0, or give the reward model its own "
                "copy (RewardModel(copy.deepcopy(palm)) or RewardModel.load(path))")
    own = reward_model.own_parameters() if isinstance(reward_model, RewardModel) else list(reward_model.parameters())
    policy = {id(p) for p in actor_critic.own_parameters()}
    if any(id(p) in policy for p in own):
        raise ValueError("the reward model's parameters include the actor-critic's trainable ones, so freezing "
                         "the reward model would freeze the policy; give the reward model its own copy")
    for p in own:
        p.requires_grad_(False)
    reward_model.to(device).eval()
    return reward_function(reward_model)


def clip_rewards(scores: Tensor, clip: float, first: bool) -> tuple[Tensor, float]:
    """Scores clamped to +-clip (0: left alone) and the share that was clamped. On a run's first rollout, more than
    half clamped is refused: clamped, the scores are nearly constant and the policy learns nothing from them. (A
    Bradley-Terry reward model's offset is arbitrary: one trained to 85% scored reference samples at 14.8 +- 1.5,
    all of them above a clip of 10.)"""
    if clip <= 0:
        return scores, 0.0
    share = (scores.abs() > clip).float().mean().item()
    if first and share > 0.5:
        raise ValueError(f"{share:.0%} of the first rollout's rewards lie outside +-{clip:g} (mean "
                         f"{scores.mean().item():.2f}, sd {scores.std().item():.2f}): clipped, they are nearly "
                         f"constant and the policy would learn nothing from them. Normalise them (--normalize-reward), "
                         f"turn clipping off (--reward-clip 0) or clip above their range")
    return scores.clamp(-clip, clip), share


def response_logprobs(logits: Tensor, sequences: Tensor, prompt_len: int, temperature: float):
    """log-probs (b, t) of the response tokens and the log-distribution (b, t, v) they were sampled from."""
    logp = process_logits(logits[:, prompt_len - 1:-1], temperature)
    return logp.gather(-1, sequences[:, prompt_len:, None]).squeeze(-1), logp


def entropy(logp: Tensor, mask: Tensor) -> Tensor:
    p = logp.exp()
    return masked_mean(-(p * torch.where(p > 0, logp, torch.zeros_like(logp))).sum(-1), mask)


def sample(ac: Policy, prompts: list[Tensor], cfg, generator: torch.Generator, *, policy: str = "actor",
           n: int = 1, device=None) -> Generation:
    """`n` responses per prompt from the actor or the reference policy. cfg: max_new_tokens, temperature, eos_token
    (a PPOConfig). The sampler's own generator is seeded from `generator`, so the draw is repeatable. A sharded
    (FSDP) policy is gathered once for the whole draw, not once per decode step (every process must call this)."""
    ac.eval()
    device = device or next(ac.parameters()).device
    model, context = ac.sampling_model(policy)
    with context, gathered(ac):
        seed = int(torch.randint(2 ** 62, (1,), generator=generator))
        return generate(model, [p.to(device) for p in prompts for _ in range(n)], cfg.max_new_tokens,
                        temperature=cfg.temperature, eos_token=cfg.eos_token,
                        generator=torch.Generator(device=device).manual_seed(seed))


@torch.no_grad()
def require_summed(reward_model) -> None:
    """dense_reward's precondition: a summed scalar reward model, the only one whose score is a sum of token scores."""
    if not (isinstance(reward_model, RewardModel) and reward_model.pool == "sum" and reward_model.num_bins is None):
        raise ValueError("dense_reward needs a summed scalar reward model (RewardModel(pool='sum'), `train.py "
                         "reward --pool sum`): only its score is a sum of per-token scores; got "
                         f"{type(reward_model).__name__}" + (f" with pool={reward_model.pool!r}"
                                                             if isinstance(reward_model, RewardModel) else ""))


def score(reward_fn: RewardFn, gen: Generation) -> tuple[Tensor, Tensor, Tensor]:
    """Reward scores (b,), sequences and their mask (b, p + t) of a Generation."""
    seq, mask = gen.sequences()
    response_mask = torch.cat((torch.zeros_like(gen.prompt_mask), gen.mask), dim=1)
    return reward_fn(seq, mask, response_mask), seq, mask


@torch.no_grad()
def evaluate_policy(ac: Policy, reward_fn: RewardFn | None, prompts: list[Tensor], cfg, generator: torch.Generator,
                    *, actor: bool = True, best_of: int = 1, gold_fn: Judge | None = None, autocast=None) -> dict:
    """Mean reward score (and gold score) of samples from the actor or the reference policy, and the actor's KL to
    the reference; best_of > 1: that many samples per prompt, keeping the one the reward function likes best.
    Without a reward function (DPO) only the gold score and the KL are reported."""
    if best_of > 1 and reward_fn is None:
        raise ValueError("best-of-N needs a reward function to pick with")
    gen = sample(ac, prompts, cfg, generator, policy="actor" if actor else "reference", n=best_of)
    seq, seq_mask = gen.sequences()
    out, pick = {}, torch.arange(len(prompts), device=seq.device)
    if exists(reward_fn):
        scores = score(reward_fn, gen)[0]
        pick = scores.view(len(prompts), best_of).argmax(dim=1) + pick * best_of
        out.update(rm_score=scores[pick].mean().item(),
                   rm_score_std=scores[pick].std().item() if len(pick) > 1 else 0.0)
    if exists(gold_fn):
        gold = judge_texts(gold_fn, gen.tokens[pick], gen.mask[pick])
        out.update(gold_score=gold.mean().item(), gold_score_std=gold.std().item() if len(pick) > 1 else 0.0,
                   gold_per_prompt=gold.tolist())
    if best_of > 1:
        out["kl_bound"] = math.log(best_of) - (best_of - 1) / best_of  # analytic KL of best-of-N
    elif not actor:
        out["kl"] = 0.0  # samples of the reference policy itself
    else:
        p = gen.prompt.shape[1]
        with autocast() if exists(autocast) else nullcontext():
            actor_lp = response_logprobs(ac.actor_logits(seq, seq_mask), seq, p, cfg.temperature)[0]
            ref_lp = response_logprobs(ac.reference_logits(seq, seq_mask), seq, p, cfg.temperature)[0]
        out["kl"] = ((actor_lp.float() - ref_lp.float()) * gen.mask).sum(1).mean().item()
    return out


def score_gain(before: dict, after: dict, key: str = "gold_score") -> tuple[float, float]:
    """The change of `key` in standard deviations of the `before` scores, and its standard error over prompts (both
    policies answer the same prompts, so it is the error of the mean per-prompt difference; nan when unknown, and
    both nan when the reference's scores do not vary: a sparse judge on a few prompts can score them all 0)."""
    sd = before[f"{key}_std"]
    if not sd > 0:
        return float("nan"), float("nan")
    per_prompt = key.replace("_score", "") + "_per_prompt"
    stderr = float("nan")
    if per_prompt in before and per_prompt in after and len(before[per_prompt]) > 1:
        diff = torch.tensor(after[per_prompt]) - torch.tensor(before[per_prompt])
        stderr = diff.std().item() / len(diff) ** 0.5
    return (after[key] - before[key]) / sd, stderr / sd


class OnlineRLTrainer(Trainer):
    """What every online RL trainer shares: an ActorCritic, a frozen reward, prompts drawn as a function of
    (seed, step, rank), repeatable generators, and the before/after table on held-out prompts (reference policy,
    trained policy, best-of-N) that ends each run. A subclass defines `step(prompts) -> metrics`."""
    summary_file = "eval.json"
    summary_excludes = ()

    def __init__(self, actor_critic: Policy, reward_model, prompts, config, *, gold_fn: Judge | None = None,
                 accelerator=None, metadata=None):
        super().__init__(actor_critic, config, accelerator=accelerator, metadata=metadata)
        self.reward_fn = freeze_reward_model(reward_model, actor_critic, self.accelerator.device)
        if getattr(config, "critic_from_reward", False):
            if not isinstance(reward_model, RewardModel):
                raise ValueError("critic_from_reward needs a RewardModel to copy the value head from")
            actor_critic.init_critic_from_reward(reward_model)
        self.prepare(actor_critic, actor_critic.trainable_parameters())
        self.ac = actor_critic
        self.prompts = prompt_sampler(prompts) if exists(prompts) else None
        self.gold_fn = gold_fn
        self.before: dict | None = None  # the reference policy on the held-out prompts (kept across a resume)
        self.within_budget: list[Tensor] | None = None  # see over_budget

    def _generator(self, *parts) -> torch.Generator:
        """A generator that depends only on (seed, rank, parts): rollouts and shuffles survive resumption."""
        key = repr((self.config.seed, self.accelerator.process_index) + parts).encode()
        return torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(key).digest()[:7], "little"))

    def step(self, prompts: list[Tensor]) -> dict:
        raise NotImplementedError

    def over_budget(self, kl: float) -> bool:
        """config.kl_budget: True when this step's rollouts passed it. The run then ends with the weights of the last
        policy whose rollouts were within it (one step back: a step can move the KL by nats); otherwise those weights
        (the trainable ones) are kept before this step learns."""
        budget = self.config.kl_budget
        if budget <= 0:
            return False
        if kl <= budget:
            self.within_budget = [p.detach().clone() for p in self.params]
            return False
        kept = "the policy as it is (no earlier one of this run was measured within it)"
        if self.within_budget is not None:
            with torch.no_grad():
                for p, saved in zip(self.params, self.within_budget):
                    p.copy_(saved)
            kept = f"the policy of step {self.global_step}, whose rollouts were within it"
        self.stopped = (f"the rollouts' KL to the reference, {kl:.2f} nats per response, passed the budget of "
                        f"{budget:g} at step {self.global_step + 1}; the run ended with {kept}")
        return True

    def training_step(self, step: int) -> dict:
        if self.prompts is None:
            raise ValueError(f"{type(self).__name__}.train() needs prompts: pass them as the third argument")
        return self.step(self.prompts(self.config.prompts_per_iter,
                                      step_seed(self.config.seed, step, self.accelerator.process_index)))

    @torch.no_grad()
    def evaluate_policy(self, prompts: list[Tensor], *, actor: bool = True, best_of: int = 1, seed: int = 0) -> dict:
        """evaluate_policy with this trainer's models, settings and a repeatable draw."""
        return evaluate_policy(self.ac, self.reward_fn, prompts, self.config,
                               self._generator("eval", seed, actor, best_of), actor=actor, best_of=best_of,
                               gold_fn=self.gold_fn, autocast=self.accelerator.autocast)

    def on_train_begin(self, start: int, end: int, resumed: bool) -> None:
        cfg = self.config
        self.eval_set = self.prompts(cfg.eval_prompts, 10_000 + cfg.seed)
        if self.before is None:
            self.before = self.evaluate_policy(self.eval_set, actor=False)
        if self.is_main:
            lora = f"LoRA r={self.ac.lora_config.r}" if self.ac.lora else "full fine-tuning"
            print(f"{self.stage.upper()}: {cfg.prompts_per_iter} prompts x {cfg.max_new_tokens} new tokens per step "
                  f"per process, {self.accelerator.num_processes} process(es), steps {start}->{end}, {lora}")

    def on_train_end(self, summary: dict) -> None:
        cfg = self.config
        after = self.evaluate_policy(self.eval_set, actor=True)
        results = {"reference policy (before)": self.before, "trained policy (after)": after}
        if cfg.best_of > 1:
            results[f"best-of-{cfg.best_of} (reference policy + reward model)"] = self.evaluate_policy(
                self.eval_set, actor=False, best_of=cfg.best_of)
        summary["results"] = results
        if exists(self.gold_fn):
            summary["gold_gain_in_std"], summary["gold_gain_stderr"] = score_gain(self.before, after)

    def summary_lines(self, summary: dict) -> list[str]:
        keys = ["rm_score", "gold_score", "kl"] if exists(self.gold_fn) else ["rm_score", "kl"]
        lines = [f"\non {len(self.eval_set)} held-out prompts:", *results_table(summary["results"], keys)]
        if "gold_gain_in_std" in summary:
            lines.append(f"gold score change: {summary['gold_gain_in_std']:+.2f} +- {summary['gold_gain_stderr']:.2f} "
                         f"(standard error over prompts) standard deviations of the reference's scores; KL to "
                         f"reference {summary['results']['trained policy (after)']['kl']:.2f} nats")
        return lines

    def final_model(self) -> PaLM:
        return PaLM.policy_of(self.ac)  # the actor as a plain PaLM, for sampling or the next stage

    def trainer_state(self) -> dict:
        return {"before": self.before}

    def load_trainer_state(self, state: dict) -> None:
        self.before = state["before"]


def gold_panels(log, before: dict | None) -> dict:
    """The plot panel of the gold score during training beside the reference's held-out level and that level plus
    one standard deviation (empty without a gold judge)."""
    if "gold_score" not in (before or {}):
        return {}
    steps = log.series("gold_score")[0]
    level = lambda value: (steps, [value] * len(steps))  # noqa: E731
    return {"gold score": {"rollouts": log.series("gold_score"), "reference (held-out)": level(before["gold_score"]),
                           "reference + 1 sd": level(before["gold_score"] + before["gold_score_std"])}}


def results_table(results: dict[str, dict], keys: list[str]) -> list[str]:
    """Markdown rows: one policy per row, mean ± sd over prompts per key (a bound where only that is known)."""
    lines = [f"| policy | {' | '.join(keys)} |", "|---" * (len(keys) + 1) + "|"]
    for name, r in results.items():
        cells = [f"{r[k]:.3f} ± {r[k + '_std']:.3f}" if k + "_std" in r else f"{r[k]:.3f}" if k in r
                 else f"{r['kl_bound']:.3f} (bound)" for k in keys]
        lines.append(f"| {name} | {' | '.join(cells)} |")
    return lines
