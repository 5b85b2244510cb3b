"""Implicit Language Q-Learning: offline RL from a fixed set of scored responses, no sampling while training (Snell
et al. 2022, https://arxiv.org/abs/2206.11871; the losses as CarperAI's trlX defines them).

Data: JSONL rows {"prompt": str, "response": str, "reward": float} (feedback.load_scored; a ratings file, with
"rating", reads the same), e.g. the reference policy's samples scored by a judge. The reward is paid on a response's
last token; every other token earns 0. Rewards are standardised over the training data by default (scale_rewards),
so a beta means the same whatever a judge's units.

The model (`ILQLModel`): the policy (a LoRA scope on the PaLM, like `Policy`; the reference is the base with it off)
plus, on the policy's final hidden states, two Q heads (s -> a value per next token), their Polyak-averaged targets,
and a V head. With s_t the state before response token a_t, per real response token:
    TD       (Q_i(s_t, a_t) - (r_t + gamma V(s_{t+1})))^2, i = 1, 2; V after the last token is 0, V(s_{t+1}) detached
    expectile  |tau - 1[Q_target(s_t, a_t) < V(s_t)]| (Q_target - V)^2, Q_target = min of the two targets (detached)
    CQL      cross-entropy of each Q head's values over next tokens with a_t as the label (pushes down the Q of
             tokens the data never took), weighted by cql_scale
    AWAC     the policy's cross-entropy on a_t, weighted by exp(awac_beta (Q_target - V)) (detached): with
             awac_beta = 0 (trlX's default) it is plain behaviour cloning of the data
averaged over real response tokens. After each optimizer step the targets move toward the Q heads:
target <- alpha Q + (1 - alpha) target.

Generation (`ILQLSampler` in the KV-cached sampler): log pi(a | s) + beta (min_i Q_target_i(s, a) - V(s)), then top-k
and temperature; beta = 0 is the trained policy itself.

    model = ILQLModel(PaLM.load("checkpoints/pretrain/model"))
    ILQLTrainer(model, "scored.jsonl", ILQLConfig(), gold_fn=sentiment).train()
    generate(ILQLSampler(model, beta=2.0), prompts, 64, top_k=20)
"""

from __future__ import annotations

import copy
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checkpoint import register
from .config import FeedbackConfig
from .data import decode_bytes, draw
from .feedback import chunks, collate, held_out_prompts, load_examples, load_scored
from .judges import Judge, judge_texts
from .lora import LoRAConfig, use_lora
from .palm import PaLM, PaLMConfig
from .policy import Policy
from .rollout import response_logprobs, results_table, score, score_gain
from .sampling import generate
from .training import GradientTrainer, step_generator
from .utils import exists, option, require


def head(dim: int, out: int) -> nn.Sequential:
    """trlX's value/Q head: dim -> 2 dim -> out."""
    return nn.Sequential(nn.Linear(dim, 2 * dim), nn.ReLU(), nn.Linear(2 * dim, out))


@register("ilql")
class ILQLModel(Policy):
    """A Policy with two Q heads, their targets and a V head on its final hidden states."""

    def __init__(self, palm: PaLM, *, lora: LoRAConfig = LoRAConfig()):
        super().__init__(palm, lora=lora, scope="ilql")
        dim, vocab = palm.config.dim, palm.config.num_tokens
        self.q_heads = nn.ModuleList([head(dim, vocab) for _ in range(2)])
        self.target_q_heads = copy.deepcopy(self.q_heads).requires_grad_(False)
        self.v_head = head(dim, 1)

    @classmethod
    def from_config_dict(cls, config: dict) -> "ILQLModel":
        lora = LoRAConfig(**config["lora"]) if config.get("lora") else LoRAConfig(r=0)
        return cls(PaLM(PaLMConfig.from_dict(config["model"])), lora=lora)

    def own_parameters(self) -> list[nn.Parameter]:
        return super().own_parameters() + list(self.q_heads.parameters()) + list(self.v_head.parameters())

    def forward(self, tokens: Tensor, mask: Tensor, *, cache=None, sampling: bool = False) -> dict:
        """Per position: policy logits, both Q heads (not when sampling), both targets (b, n, vocab) and V (b, n)."""
        with self.generation_context():
            hidden = self.palm(tokens, mask=mask, cache=cache, return_hidden=True)
        return {"logits": self.palm.to_logits(hidden),
                "q": [] if sampling else [q(hidden) for q in self.q_heads],
                "target_q": [q(hidden).detach() for q in self.target_q_heads], "v": self.v_head(hidden).squeeze(-1)}

    @torch.no_grad()
    def sync_targets(self, alpha: float) -> None:
        for q, target in zip(self.q_heads.parameters(), self.target_q_heads.parameters()):
            target.lerp_(q, alpha)


class ILQLSampler(nn.Module):
    """What `generate` samples from: the policy's log-probs shifted by beta times the advantage of each next token."""

    def __init__(self, model: ILQLModel, beta: float):
        super().__init__()
        self.model, self.beta = model, beta
        self.config, self.check_tokens = model.palm.config, model.palm.check_tokens

    def forward(self, tokens: Tensor, *, mask: Tensor | None = None, cache=None) -> Tensor:
        mask = mask if exists(mask) else torch.ones_like(tokens, dtype=torch.bool)
        out = self.model(tokens, mask, cache=cache, sampling=True)
        advantage = torch.minimum(*out["target_q"]) - out["v"][..., None]
        return out["logits"].float().log_softmax(-1) + self.beta * advantage.float()


def ilql_loss(out: dict, tokens: Tensor, response_mask: Tensor, rewards: Tensor, *, gamma: float, tau: float,
              cql_scale: float, awac_scale: float, awac_beta: float) -> tuple[Tensor, dict]:
    """ILQL's loss (module docstring) for sequences `tokens` (b, n) with response tokens `response_mask` and a reward
    (b,) on each one's last response token; `out` is ILQLModel's output for tokens[:, :-1]."""
    actions, mask = tokens[:, 1:], response_mask[:, 1:].float()               # a_t and the states s_t before them
    n_real = mask.sum().clamp(min=1)
    last = mask * (mask.cumsum(1) == mask.sum(1, keepdim=True)).float()       # the last response token of each row
    r = last * rewards[:, None]
    pick = lambda values: values.float().gather(-1, actions[..., None]).squeeze(-1)  # noqa: E731
    q = [pick(x) for x in out["q"]]
    target = torch.minimum(*[pick(x) for x in out["target_q"]]).detach()
    v = out["v"].float()
    v_next = torch.cat((v[:, 1:], torch.zeros_like(v[:, :1])), dim=1) * (mask - last)  # 0 after the last token
    td_target = (r + gamma * v_next).detach()
    loss_q = sum((((qi - td_target) ** 2) * mask).sum() / n_real for qi in q)
    diff = target - v
    loss_v = ((torch.where(diff >= 0, tau, 1 - tau) * diff ** 2) * mask).sum() / n_real
    ce = lambda logits: F.cross_entropy(logits.float().transpose(1, 2), actions, reduction="none")  # noqa: E731
    loss_cql = sum((ce(x) * mask).sum() / n_real for x in out["q"])
    awac_weight = torch.exp(awac_beta * diff).detach()
    loss_awac = (ce(out["logits"]) * awac_weight * mask).sum() / n_real
    loss = loss_q + loss_v + cql_scale * loss_cql + awac_scale * loss_awac
    return loss, {"loss_q": loss_q.item(), "loss_v": loss_v.item(), "loss_cql": loss_cql.item(),
                  "loss_awac": loss_awac.item(), "v": ((v * mask).sum() / n_real).item()}


@torch.no_grad()
def evaluate_ilql(model: ILQLModel, prompts: list[Tensor], beta: float | None, cfg, generator: torch.Generator, *,
                  gold_fn: Judge | None = None, reward_fn=None) -> dict:
    """Prompts answered at generation `beta` (None: the reference policy), top-k and temperature from `cfg`: the
    judge's score, the reward function's, and the KL of the distribution sampled from to the reference (nats per
    response; top-k alone makes it > 0), as rollout.evaluate_policy reports them."""
    device = next(model.parameters()).device
    prompts = [p.to(device) for p in prompts]
    kw = dict(temperature=cfg.temperature, top_k=cfg.top_k, generator=generator)
    if beta is None:
        with use_lora(model.palm):
            gen = generate(model.palm, prompts, cfg.max_new_tokens, **kw)
    else:
        gen = generate(ILQLSampler(model, beta), prompts, cfg.max_new_tokens, **kw)
    seq, seq_mask = gen.sequences()
    ref_lp = response_logprobs(model.reference_logits(seq, seq_mask), seq, gen.prompt.shape[1], cfg.temperature)[0]
    out = {"kl": ((gen.logprobs - ref_lp) * gen.mask).sum(1).mean().item()}
    if exists(reward_fn):
        scores = score(reward_fn, gen)[0]
        out.update(rm_score=scores.mean().item(), rm_score_std=scores.std().item())
    if exists(gold_fn):
        gold = judge_texts(gold_fn, gen.tokens, gen.mask)
        out.update(gold_score=gold.mean().item(), gold_score_std=gold.std().item(), gold_per_prompt=gold.tolist())
    out["samples"] = [decode_bytes(t[m].tolist()) for t, m in zip(gen.tokens.cpu(), gen.mask.cpu())]
    return out


@dataclass
class ILQLConfig(FeedbackConfig):
    lr: float = 3e-4
    checkpoint_dir: str = "checkpoints/ilql"
    gamma: float = option(0.99, "discount of the TD target")
    tau: float = option(0.7, "expectile of V's regression toward the target Q")
    cql_scale: float = option(0.1, "weight of the conservative (CQL) term")
    awac_scale: float = option(1.0, "weight of the policy's (AWAC) loss")
    awac_beta: float = option(0.0, "AWAC's advantage weighting exp(awac_beta (Q - V)); 0 = behaviour cloning")
    alpha: float = option(0.005, "Polyak rate of the target Q heads, per optimizer step")
    scale_rewards: bool = option(True, "standardise rewards over the training data (mean 0, sd 1), so that beta means "
                                       "the same for any judge's units")
    betas_eval: tuple[str, ...] = option(("0", "1", "4", "16"), "generation betas evaluated at the end")
    top_k: int = option(20, "sample among the top-k tokens at evaluation (trlX's default)")
    eval_prompts: int = option(64, "held-out prompts answered at the end (KL, judge); 0 = none")
    max_new_tokens: int = option(64, "response length when sampling at evaluation")
    temperature: float = option(1.0, "sampling temperature at evaluation (> 0)")

    def __post_init__(self):
        super().__post_init__()
        require(0 <= self.gamma <= 1, self, "gamma", "must lie in [0, 1]")
        require(0 < self.tau < 1, self, "tau", "must lie in (0, 1)")
        require(0 < self.alpha <= 1, self, "alpha", "must lie in (0, 1]")
        require(self.top_k >= 1, self, "top_k", "must be >= 1")
        require(self.temperature > 0, self, "temperature", "must be > 0")
        try:
            self.betas_eval = tuple(str(float(b)) for b in self.betas_eval)
        except ValueError:
            require(False, self, "betas_eval", "must be numbers")


class ILQLTrainer(GradientTrainer):
    """Trains an ILQLModel on scored responses; at the end, samples held-out prompts at each beta of
    `config.betas_eval` and reports the judge's score and the KL to the reference (the base policy)."""
    stage = "ilql"
    summary_file = "eval.json"
    progress_keys = ("loss", "loss_q", "loss_v")
    plots = {"loss": {"train": "loss", "held-out": "val_loss"},
             "terms": {"TD": "loss_q", "expectile": "loss_v", "CQL": "loss_cql", "AWAC": "loss_awac"},
             "mean V": {"train": "v"}}

    def __init__(self, model: ILQLModel, train: list[dict] | str | Path, config: ILQLConfig | None = None, *,
                 val: list[dict] | str | Path | None = None, gold_fn: Judge | None = None, accelerator=None,
                 metadata=None):
        config = config if exists(config) else ILQLConfig()
        max_len = min(config.max_len, model.palm.config.max_seq_len)
        _, self.train_set, self.val_set = load_examples(train, val, load_scored, ("response",), max_len,
                                                        config.val_fraction)
        super().__init__(model, config, accelerator=accelerator, metadata=metadata)
        self.ilql, self.gold_fn = model, gold_fn
        self.eval_set = held_out_prompts(self.val_set, config.eval_prompts)
        self.data_rewards = [e[0].rating for e in self.train_set + self.val_set]
        if any(r is None for r in self.data_rewards):
            raise ValueError('every ILQL example needs a numeric "reward"')
        train_rewards = [e[0].rating for e in self.train_set]
        self.reward_shift, self.reward_scale = 0.0, 1.0
        if config.scale_rewards and len(train_rewards) > 1 and statistics.pstdev(train_rewards) > 0:
            self.reward_shift, self.reward_scale = statistics.fmean(train_rewards), statistics.pstdev(train_rewards)

    def batch_loss(self, items) -> tuple[Tensor, dict]:
        cfg = self.config
        b = {k: v.to(self.accelerator.device) for k, v in collate([e[0] for e in items]).items()}
        rewards = (torch.tensor([e[0].rating for e in items], device=self.accelerator.device) - self.reward_shift) / \
            self.reward_scale
        out = self.model(b["tokens"][:, :-1], b["mask"][:, :-1])
        return ilql_loss(out, b["tokens"], b["response_mask"], rewards, gamma=cfg.gamma, tau=cfg.tau,
                         cql_scale=cfg.cql_scale, awac_scale=cfg.awac_scale, awac_beta=cfg.awac_beta)

    def loss(self, step: int, micro: int):
        g = step_generator(self.config.seed, step, micro, self.accelerator.process_index)
        return self.batch_loss(draw(self.train_set, self.config.batch_size, g))

    def training_step(self, step: int) -> dict:
        out = super().training_step(step)
        if "loss" in out:  # the update happened
            self.ilql.sync_targets(self.config.alpha)
        return out

    @torch.no_grad()
    def evaluate(self) -> dict:
        self.model.eval()
        losses = [self.batch_loss(chunk)[0].item() for chunk in chunks(self.val_set, self.config.batch_size)]
        self.model.train()
        return {"val_loss": sum(losses) / len(losses)}

    def sample(self, beta: float | None) -> dict:
        cfg = self.config
        return evaluate_ilql(self.ilql, self.eval_set, beta, cfg, torch.Generator().manual_seed(cfg.seed + 10_007),
                             gold_fn=self.gold_fn)

    def on_train_end(self, summary: dict) -> None:
        if not self.eval_set:
            return
        before = self.sample(None)
        results = {"reference policy (top-k)": before}
        results.update({f"ILQL, beta {float(b):g}": self.sample(float(b)) for b in self.config.betas_eval})
        summary["results"] = results
        mean, sd = statistics.fmean(self.data_rewards), statistics.pstdev(self.data_rewards)
        summary["data_reward"] = {"mean": mean, "sd": sd}
        if exists(self.gold_fn):   # vs the reference's samples, and vs the data (ILQL's floor: data mean + 1 sd)
            summary["gold_gain_in_std"] = {name: score_gain(before, r)[0] for name, r in results.items()}
            summary["gold_over_data_in_std"] = {name: (r["gold_score"] - mean) / sd if sd > 0 else float("nan")
                                                for name, r in results.items()}

    def summary_lines(self, summary: dict) -> list[str]:
        if "results" not in summary:
            return []
        keys = ["gold_score", "kl"] if exists(self.gold_fn) else ["kl"]
        return [f"on {len(self.eval_set)} held-out prompts (KL: nats per response, of the distribution sampled "
                f"from, to the reference):", *results_table(summary["results"], keys)]

    def final_model(self) -> ILQLModel:
        return self.ilql  # with its heads: generation needs them (PaLM.load of the file gives the policy alone)
