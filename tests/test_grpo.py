"""GRPO and RLOO: advantages and loss normalisations by hand, the invariants (ratio exactly 1 on the first pass,
KL 0 at the start), the toy 'e' task learnt by both, resume == uninterrupted through the CLI; the KL budget of
every online trainer (PPO too)."""

import json
import math

import pytest
import torch

from palm_rlhf import ActorCritic, LoRAConfig, PaLM, Policy, PPOConfig, PPOTrainer, cli
from palm_rlhf.grpo import (GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer, clipped_surrogate,
                            dense_group_advantages, group_advantages, k3_kl, token_mean)
from palm_rlhf.utils import ConfigError

from test_ppo import base, count_reward, prompts  # noqa: F401  (the 'test' PaLM pretrained 40 steps; the toy task)


def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 2.0, 3.0, 6.0, 5.0, 5.0, 5.0, 5.0])       # two groups of 4; the second all equal
    mean1, std1, std_all = 3.0, torch.tensor([1.0, 2.0, 3.0, 6.0]).std().item(), r.std().item()
    none = torch.tensor([-2.0, -1.0, 0.0, 3.0, 0, 0, 0, 0])
    torch.testing.assert_close(group_advantages(r, 4, scale="none"), none)
    torch.testing.assert_close(group_advantages(r, 4, scale="batch"), none / (std_all + 1e-6))
    group = torch.cat((none[:4] / (std1 + 1e-6), torch.zeros(4)))      # equal rewards: 0, not 0/0
    torch.testing.assert_close(group_advantages(r, 4, scale="group"), group)
    loo = torch.tensor([r[i] - (r[(i // 4) * 4:(i // 4) * 4 + 4].sum() - r[i]) / 3 for i in range(8)])
    torch.testing.assert_close(group_advantages(r, 4, leave_one_out=True, scale="none"), loo)
    assert mean1 == r[:4].mean()
    flat = group_advantages(torch.full((6,), 0.3), 3, scale="group")
    assert torch.equal(flat, torch.zeros(6)) and not flat.isnan().any()
    assert not group_advantages(torch.zeros(6), 3, scale="batch").isnan().any()


def test_dense_group_advantages_by_hand():
    """Reward-to-go per token, baselined by the group at the same position; all reward at the last token is the
    sequence advantage at every token."""
    r = torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, 0.0]])             # one group of 2: to go [3, 2, 2] and [1, 1, 0]
    mask = torch.ones(2, 3)
    none = torch.tensor([[1.0, 0.5, 1.0], [-1.0, -0.5, -1.0]])        # minus the position means [2, 1.5, 1]
    torch.testing.assert_close(dense_group_advantages(r, mask, 2, scale="none"), none)
    torch.testing.assert_close(dense_group_advantages(r, mask, 2, leave_one_out=True, scale="none"), 2 * none)
    torch.testing.assert_close(dense_group_advantages(r, mask, 2, scale="batch"), none / (2 ** 0.5 + 1e-6))
    totals = torch.tensor([1.0, 2.0, 3.0, 6.0, 5.0, 5.0, 5.0, 5.0])
    last = torch.zeros(8, 5)
    last[:, -1] = totals
    for scale in ("none", "batch", "group"):
        for loo in (False, True):
            seq = group_advantages(totals, 4, leave_one_out=loo, scale=scale)
            torch.testing.assert_close(dense_group_advantages(last, torch.ones(8, 5), 4, leave_one_out=loo,
                                                              scale=scale), seq[:, None].expand(8, 5))
    short = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])          # the padding's rewards and advantages are 0
    assert dense_group_advantages(torch.ones(2, 3), short, 2, scale="none")[1].eq(0).all()


def test_loss_normalisations_by_hand():
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]]).bool()
    assert token_mean(x, mask, "sequence", 4).item() == pytest.approx((10 / 4 + 30 / 2) / 2)
    assert token_mean(x, mask, "token", 4).item() == pytest.approx(40 / 6)
    assert token_mean(x, mask, "constant", 4).item() == pytest.approx(40 / 8)
    full = torch.ones_like(mask)                                          # fixed-length responses: all three agree
    assert len({round(token_mean(x, full, t, 4).item(), 6) for t in ("sequence", "token", "constant")}) == 1


def test_k3_and_the_asymmetric_clip_by_hand():
    lp, ref = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -2.0]])
    kl = k3_kl(lp, ref)
    assert kl[0, 0].item() == pytest.approx(math.exp(-0.5) + 0.5 - 1) and kl[0, 1].item() == 0
    old = torch.zeros(2, 1)
    new = torch.log(torch.tensor([[1.5], [0.5]]))                        # ratios 1.5 and 0.5
    loss, clipped = clipped_surrogate(new, old, torch.tensor([1.0, -1.0]), clip_low=0.2, clip_high=0.28)
    assert loss[0, 0].item() == pytest.approx(-1.28)                      # A > 0: capped at 1 + clip_high
    assert loss[1, 0].item() == pytest.approx(0.8)                        # A < 0: capped at 1 - clip_low
    assert clipped.all()


def make(base, cls=GRPOTrainer, lora_r=8, **cfg):  # noqa: F811
    torch.manual_seed(0)
    config_cls = GRPOConfig if cls is GRPOTrainer else RLOOConfig
    defaults = dict(prompts_per_iter=4, group_size=4, minibatch_size=8, max_new_tokens=12, lr=1e-2, seed=0)
    return cls(Policy(PaLM.load(base), lora=LoRAConfig(r=lora_r)), count_reward,
               config=config_cls(**{**defaults, **cfg}))


@pytest.mark.parametrize("cls", [GRPOTrainer, RLOOTrainer])
def test_first_pass_ratio_is_one_and_kl_zero(base, cls):  # noqa: F811
    trainer = make(base, cls, epochs=2)
    memory = trainer.rollout(prompts(4))
    assert memory["seq_kl"].abs().max() == 0                             # fresh LoRA: policy == reference
    assert memory["advantages"].view(4, 4).sum(1).abs().max() < 1e-5     # a baseline from the group: sums to 0
    stats = trainer.learn(memory)
    assert stats["first_ratio_max_dev"] == 0.0


@pytest.mark.parametrize("cls,extra", [(GRPOTrainer, {}), (RLOOTrainer, {}),
                                       (GRPOTrainer, {"scale_rewards": "group", "loss_type": "sequence",
                                                      "clip_high": 0.28, "kl_coef": 0.0})])
def test_toy_task_reward_rises(base, cls, extra):  # noqa: F811
    """Reward = share of 'e' bytes: a few iterations must raise it clearly (full fine-tuning, as PPO's test)."""
    trainer = make(base, cls, lora_r=0, lr=3e-3, max_new_tokens=24, prompts_per_iter=4, group_size=8,
                   minibatch_size=16, epochs=2, kl_coef=extra.pop("kl_coef", 0.01), **extra)
    held_out = prompts(32, seed=99)
    start = trainer.evaluate_policy(held_out)["rm_score"]
    for it in range(12):
        trainer.step(prompts(4, seed=it))
    end = trainer.evaluate_policy(held_out)
    assert end["rm_score"] > start + 0.15 and end["rm_score"] > 3 * start, (start, end)
    assert end["kl"] > 0


@pytest.mark.parametrize("cls", [GRPOTrainer, RLOOTrainer])
def test_dense_reward_at_the_first_token_is_the_sequence_advantage(base, cls):  # noqa: F811
    """With a summed reward model, dense_reward's advantage of a response's first token (its reward to go is the
    whole score) is the sequence advantage; later tokens differ. A reward that is no summed model is refused."""
    from palm_rlhf import RewardModel
    torch.manual_seed(1)
    rm = RewardModel(PaLM.load(base), pool="sum")
    torch.nn.init.normal_(rm.head.weight, std=0.5)
    config_cls = GRPOConfig if cls is GRPOTrainer else RLOOConfig
    trainer = cls(Policy(PaLM.load(base), lora=LoRAConfig(r=4)), rm, config=config_cls(
        prompts_per_iter=2, group_size=4, minibatch_size=8, max_new_tokens=12, seed=0, dense_reward=True))
    memory = trainer.rollout(prompts(2))
    adv = memory["advantages"]
    assert adv.shape == memory["action_mask"].shape
    seq = group_advantages(memory["scores"], 4, leave_one_out=cls is RLOOTrainer, scale=trainer.config.scale_rewards)
    torch.testing.assert_close(adv[:, 0], seq, rtol=1e-4, atol=1e-4)   # fresh LoRA: no KL to pay yet
    assert not torch.allclose(adv[:, 6], seq, atol=1e-3)
    assert trainer.learn(memory)["first_ratio_max_dev"] == 0.0
    with pytest.raises(ValueError, match="summed scalar reward model"):
        make(base, cls, dense_reward=True)


def test_bad_settings_are_refused():
    with pytest.raises(ConfigError, match="group_size"):
        GRPOConfig(group_size=1)
    with pytest.raises(ConfigError, match="minibatch_size"):
        GRPOConfig(prompts_per_iter=3, group_size=3, minibatch_size=2)
    with pytest.raises(ConfigError, match="scale_rewards"):
        RLOOConfig(scale_rewards="sometimes")


@pytest.mark.parametrize("stage", ["grpo", "rloo"])
def test_cli_resume_equals_uninterrupted(base, tmp_path, text_file, stage):  # noqa: F811
    args = lambda out, *extra: [stage, "--init", str(base), "--reward-fn", "prose", "--data", str(text_file),  # noqa
                                "--prompt-len", "8", "--prompts-per-iter", "2", "--group-size", "4",
                                "--minibatch-size", "4", "--max-new-tokens", "8", "--eval-prompts", "4",
                                "--best-of", "2", "--gold", "--checkpoint-dir", str(tmp_path / out), "--quiet",
                                "--checkpoint-interval", "1", "--steps", "4", *extra]
    full = cli.main(args("full"))
    cli.main(args("cut", "--stop-after", "2"))
    rest = cli.main(args("cut", "--resume", "auto"))
    keys = ("rm_score", "kl", "policy_loss", "k3_kl")
    first_two = [json.loads(x) for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()[:2]]
    values = lambda rows: [[r[k] for k in keys] for r in rows]  # noqa: E731
    assert values(first_two + rest["history"]) == values(full["history"])
    assert full["results"] == rest["results"]
    assert (tmp_path / "full" / f"{stage}.png").is_file() and (tmp_path / "full" / "model").is_dir()
    assert "gold_gain_in_std" in json.loads((tmp_path / "full" / "eval.json").read_text())


def offset_reward(tokens, mask, response_mask):
    """The toy reward plus a large constant: a reward model's offset is arbitrary."""
    return count_reward(tokens, mask, response_mask) + 15.0


def test_rewards_outside_the_clip_stop_the_run_with_the_fix(base):  # noqa: F811
    """Clamped to +-10, rewards of 15 +- a little are a constant: the first rollout refuses to learn from them (PPO
    too); without a clip (GRPO's default) the offset does not matter: advantages are the toy reward's."""
    from palm_rlhf import ActorCritic, PPOConfig, PPOTrainer
    clipped = GRPOTrainer(Policy(PaLM.load(base), lora=LoRAConfig(r=4)), offset_reward, config=GRPOConfig(
        prompts_per_iter=2, group_size=4, minibatch_size=8, max_new_tokens=8, reward_clip=10.0))
    with pytest.raises(ValueError, match="100% of the first rollout's rewards lie outside"):
        clipped.step(prompts(2))
    ppo = PPOTrainer(ActorCritic(PaLM.load(base), lora=LoRAConfig(r=4)), offset_reward, config=PPOConfig(
        prompts_per_iter=2, minibatch_size=2, max_new_tokens=8))
    with pytest.raises(ValueError, match="--normalize-reward"):
        ppo.step(prompts(2))
    plain, offset = (make(base, reward_clip=0.0) for _ in range(2))
    offset.reward_fn = offset_reward
    a, b = plain.rollout(prompts(4)), offset.rollout(prompts(4))
    torch.testing.assert_close(a["advantages"], b["advantages"], atol=1e-4, rtol=1e-4)
    assert GRPOConfig().reward_clip == 0.0 and b["advantages"].abs().max() > 0


@pytest.mark.parametrize("stage", ["ppo", "grpo", "rloo"])
def test_kl_budget_ends_the_run_before_learning_past_it(base, tmp_path, stage):  # noqa: F811
    """kl_budget: the first step whose rollouts pass it learns nothing and is the last, and the run keeps the last
    policy whose rollouts were within it. Step 1's rollouts come from the reference (KL 0); which later step first
    passes 1e-4 is read off the same run without a budget (the KL of a step's rollouts is a sampled estimate, and can
    be negative: on one toy model step 2's was -0.11), and the budgeted run must end there, with the policy that
    sampled the step before's rollouts (not the next one), export the model, say why, and have nothing left to do on
    resume."""
    def trainer(folder, **cfg):
        torch.manual_seed(0)
        common = dict(max_new_tokens=12, lr=1e-2, seed=0, eval_prompts=2, best_of=0, quiet=True,
                      checkpoint_dir=str(tmp_path / folder), **cfg)
        if stage == "ppo":
            return PPOTrainer(ActorCritic(PaLM.load(base), lora=LoRAConfig(r=8)), count_reward, prompts(32),
                              PPOConfig(prompts_per_iter=8, minibatch_size=4, ppo_epochs=2, **common))
        cls, config_cls = (GRPOTrainer, GRPOConfig) if stage == "grpo" else (RLOOTrainer, RLOOConfig)
        return cls(Policy(PaLM.load(base), lora=LoRAConfig(r=8)), count_reward, prompts(32),
                   config_cls(prompts_per_iter=4, group_size=4, minibatch_size=8, **common))

    kls = [row["kl"] for row in trainer("free", steps=20, stop_after=5).train()["history"]]
    passed = [i + 1 for i, kl in enumerate(kls) if kl > 1e-4]
    assert passed and passed[0] >= 2, kls          # the policy moves within 5 steps; step 1 is the reference's
    at = passed[0]
    budgeted = trainer("budget", steps=20, kl_budget=1e-4)
    summary = budgeted.train()
    assert summary["final_step"] == at and f"passed the budget of 0.0001 at step {at}" in summary["stopped"]
    assert f"with the policy of step {at - 1}" in summary["stopped"]
    assert summary["history"][-1]["kl"] == kls[at - 1] and (tmp_path / "budget" / "model").is_dir()

    def weights_after(steps):   # the policy that samples step steps + 1's rollouts
        t = trainer(f"after{steps}", steps=20, stop_after=max(steps, 1))
        if steps:
            t.train()
        return t.params
    # kept: the policy that sampled step at - 1's rollouts (within the budget), not the next one (whose were not)
    assert all(torch.equal(a, b) for a, b in zip(budgeted.params, weights_after(at - 2)))
    assert not all(torch.equal(a, b) for a, b in zip(budgeted.params, weights_after(at - 1)))
    again = trainer("budget", steps=20, kl_budget=1e-4).train(resume="auto")
    assert again["steps_run"] == 0
