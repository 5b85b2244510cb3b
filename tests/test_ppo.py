"""PPO: the maths by hand, the invariants (KL 0, ratio exactly 1), every trainer branch, a toy task it must learn."""

import json
import math

import pytest
import torch

from palm_rlhf import ActorCritic, ConfigError, LoRAConfig, PaLM, PPOConfig, PPOTrainer, cli
from palm_rlhf.ppo import AdaptiveKLController, gae, policy_loss, value_loss
from palm_rlhf.rollout import score_gain
from palm_rlhf.utils import masked_whiten

TARGET_BYTE = ord("e")


def count_reward(tokens, mask, response_mask):
    """Toy reward: the share of response bytes that are 'e'."""
    hits = ((tokens == TARGET_BYTE) & response_mask).float().sum(1)
    return hits / response_mask.float().sum(1).clamp(min=1)


def pretrain_toy(tmp_path_factory, text_file, *model: str):
    """The 'test' PaLM after 40 pretraining steps on real text (model: PaLMConfig overrides, KEY=VALUE)."""
    d = tmp_path_factory.mktemp("toy")
    cli.main(["pretrain", "--preset", "test", "--model", *model, "--data", str(text_file), "--steps", "40",
              "--seq-len", "64", "--batch-size", "8", "--lr", "1e-2", "--eval-interval", "40", "--eval-batches", "1",
              "--sample-interval", "0", "--checkpoint-dir", str(d), "--quiet"])
    return d / "last.pt"


@pytest.fixture(scope="module")
def base(tmp_path_factory, text_file):
    """The toy policy: it writes 'e' about 7% of the time."""
    return pretrain_toy(tmp_path_factory, text_file)


def make_trainer(base, lora_r=8, lr=1e-2, **cfg):
    torch.manual_seed(0)
    defaults = dict(prompts_per_iter=8, minibatch_size=4, max_new_tokens=12, ppo_epochs=2, lr=lr, seed=0)
    return PPOTrainer(ActorCritic(PaLM.load(base), lora=LoRAConfig(r=lora_r)), count_reward,
                      config=PPOConfig(**{**defaults, **cfg}))


def prompts(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(97, 123, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g) for _ in range(n)]


def test_gae_against_hand_computation():
    rewards = torch.tensor([[1.0, 0.0, 2.0, 0.0]])
    values = torch.tensor([[0.5, 0.2, 0.1, 9.0]])
    mask = torch.tensor([[True, True, True, False]])  # the episode ends after 3 tokens
    gamma, lam = 0.9, 0.8
    d2 = 2.0 - 0.1                                    # last real step: next value is 0
    d1 = 0.0 + gamma * 0.1 - 0.2
    d0 = 1.0 + gamma * 0.2 - 0.5
    a2 = d2
    a1 = d1 + gamma * lam * a2
    a0 = d0 + gamma * lam * a1
    adv, ret = gae(rewards, values * mask, mask, gamma, lam)
    torch.testing.assert_close(adv, torch.tensor([[a0, a1, a2, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[a0 + 0.5, a1 + 0.2, a2 + 0.1, 0.0]]))


def test_masked_whitening_uses_only_real_entries():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[True, True, True, False]])
    w = masked_whiten(x, mask)
    assert w[0, 3] == 0
    torch.testing.assert_close(w[0, :3], torch.tensor([-1.0, 0.0, 1.0]), atol=1e-4, rtol=1e-4)


def test_policy_and_value_losses_by_hand():
    old = torch.log(torch.tensor([[0.5, 0.5]]))
    new = torch.log(torch.tensor([[0.75, 0.25]]))      # ratios 1.5 and 0.5
    adv = torch.tensor([[1.0, 1.0]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    loss, clip_frac, approx_kl, ratio = policy_loss(new, old, adv, mask, clip=0.2)
    # token 1: min(1.5, 1.2) * 1 = 1.2; token 2: min(0.5, 0.8) = 0.5 -> loss = -(1.2 + 0.5) / 2
    assert loss.item() == pytest.approx(-0.85)
    assert clip_frac.item() == pytest.approx(0.5)
    assert approx_kl.item() == pytest.approx(((0.5 - torch.log(torch.tensor(1.5))) + (-0.5 - torch.log(torch.tensor(0.5)))).item() / 2)
    v_loss, v_clip = value_loss(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 0.0]]), torch.tensor([[2.0, 1.0]]),
                                mask, clip=0.2)
    # token 1: max((1-2)^2, (0.2-2)^2) = 3.24; token 2: max(1, 1) = 1 -> 0.5 * mean = 1.06
    assert v_loss.item() == pytest.approx(1.06)
    assert v_clip.item() == pytest.approx(0.5)


def test_adaptive_kl_controller():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=100)
    ctl.update(12.0, n=10)                               # error clipped to +0.2
    assert ctl.kl_coef == pytest.approx(0.1 * 1.02)
    fixed = AdaptiveKLController(0.1, 6.0, 100, adaptive=False)
    fixed.update(12.0, 10)
    assert fixed.kl_coef == 0.1


def test_kl_is_zero_and_first_ratio_exactly_one(base):
    trainer = make_trainer(base)
    memory = trainer.rollout(prompts())
    assert memory.kl.abs().max() == 0                    # fresh LoRA (B = 0): actor == reference
    m = memory.action_mask
    torch.testing.assert_close(memory.logprobs[m], memory.sampler_logprobs[m], atol=1e-5,
                               rtol=1e-5)                # the sampler reported the exact sampling distribution
    stats = trainer.learn(memory)
    assert stats["first_ratio_max_dev"] == 0.0


def test_sharing_the_rollout_forward_changes_nothing(base):
    """step() keeps the rollout's first-minibatch forward (same weights, same grouping) for the first learning step;
    the update must be exactly what recomputing that forward gives."""
    after = []
    for keep in (True, False):
        trainer = make_trainer(base)
        memory = trainer.rollout(prompts(), keep_first_forward=keep)
        assert (memory.first_forward is not None) == keep
        stats = trainer.learn(memory)
        assert memory.first_forward is None                  # consumed (and its graph freed) by the first step
        after.append(([p.detach().clone() for p in trainer.params], stats))
    for shared, recomputed in zip(after[0][0], after[1][0]):
        torch.testing.assert_close(shared, recomputed, atol=1e-6, rtol=1e-6)
    assert after[0][1]["policy_loss"] == pytest.approx(after[1][1]["policy_loss"], abs=1e-6)


def test_memory_is_linear_in_sequence_length(base):
    memory = make_trainer(base).rollout(prompts())
    for name, value in vars(memory).items():
        if isinstance(value, torch.Tensor):
            assert value.ndim <= 2, f"{name} has shape {tuple(value.shape)}: more than O(batch x sequence)"


@pytest.mark.parametrize("branch", [
    dict(lora_r=0), dict(max_grad_norm=0.0), dict(adaptive_kl=False), dict(entropy_coef=0.01),
    dict(early_stop_kl=1e-9), dict(normalize_reward=True, reward_clip=0.0), dict(temperature=0.7),
    dict(eos_token=TARGET_BYTE),  # rows that stop early still score (their share of "e" is 1 / length)
])
def test_every_branch_takes_a_real_step(base, branch):
    branch = dict(branch)
    lora_r = branch.pop("lora_r", 8)
    trainer = make_trainer(base, lora_r=lora_r, **branch)
    before = [p.detach().clone() for p in trainer.params]
    stats = trainer.step(prompts())
    moved = sum(not torch.equal(a, p.detach()) for a, p in zip(before, trainer.params))
    # after a single optimizer step (early stop) some LoRA matrices cannot move yet (their partner starts at 0)
    if "early_stop_kl" in branch:
        assert moved > 0
    else:
        assert moved == len(trainer.params), f"{moved} of {len(trainer.params)} parameter tensors changed"
    finite = {k: v for k, v in stats.items() if isinstance(v, float) and k != "explained_variance"}
    assert all(v == v and abs(v) != float("inf") for v in finite.values()), finite
    if "early_stop_kl" in branch:
        assert stats["early_stopped"] and stats["epochs_run"] == 1
    if "eos_token" in branch:
        assert stats["response_tokens"] < 12  # some rows did stop at the EOS
    if lora_r == 0:
        assert not trainer.ac.lora and not any(p.requires_grad for p in trainer.ac.reference.parameters())


def test_toy_task_reward_rises(base):
    """Reward = share of 'e' bytes in the response: a few PPO iterations must raise it clearly (full fine-tuning:
    a LoRA on this 32-wide toy cannot sharpen logits through its frozen, tiny tied embeddings)."""
    trainer = make_trainer(base, lora_r=0, lr=3e-3, max_new_tokens=24, prompts_per_iter=16, minibatch_size=8,
                           ppo_epochs=4, kl_coef=0.01)
    held_out = prompts(32, seed=99)
    start = trainer.evaluate_policy(held_out)["rm_score"]
    for it in range(12):
        trainer.step(prompts(16, seed=it))
    end = trainer.evaluate_policy(held_out)
    assert end["rm_score"] > start + 0.15 and end["rm_score"] > 3 * start, (start, end)
    assert end["kl"] > 0


@pytest.fixture(scope="module")
def ppo_setup(base, tmp_path_factory, text_file):
    """The toy policy and a reward model trained on it, through the real CLI stages."""
    d = tmp_path_factory.mktemp("ppo")
    pairs = d / "pairs.jsonl"
    pairs.write_text("\n".join(json.dumps({"prompt": "p", "chosen": "eee", "rejected": "xyz"}) for _ in range(20)))
    cli.main(["reward", "--init", str(base), "--train", str(pairs), "--steps", "3", "--max-len", "16",
                "--checkpoint-dir", str(d / "rm"), "--quiet"])
    return base, d, text_file


def ppo_args(base, d, data, ckpt, *extra):
    return ["ppo", "--init", str(base), "--reward", str(d / "rm" / "last.pt"), "--data", str(data),
            "--prompt-len", "8", "--prompts-per-iter", "4", "--minibatch-size", "2", "--max-new-tokens", "8",
            "--ppo-epochs", "2", "--eval-prompts", "4", "--best-of", "2", "--gold", "--checkpoint-dir", str(ckpt),
            "--quiet", "--checkpoint-interval", "1", *extra]


def test_ppo_cli_resume_equals_uninterrupted(ppo_setup, tmp_path):
    full = cli.main(ppo_args(*ppo_setup, tmp_path / "full", "--steps", "4", "--critic-from-reward"))
    cli.main(ppo_args(*ppo_setup, tmp_path / "cut", "--steps", "4", "--critic-from-reward", "--stop-after", "2"))
    with open(tmp_path / "cut" / "metrics.jsonl", "a") as f:  # a row written after the last checkpoint, then a crash
        f.write(json.dumps({"step": 3, "rm_score": 99.0}) + "\n" + '{"step": 4, "rm_sc')
    rest = cli.main(ppo_args(*ppo_setup, tmp_path / "cut", "--steps", "4", "--critic-from-reward",
                               "--resume", "auto"))
    keys = ("rm_score", "kl", "policy_loss", "value_loss", "kl_coef")
    first_two = [json.loads(x) for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()[:2]]
    assert [[r[k] for k in keys] for r in first_two + rest["history"]] == [[r[k] for k in keys] for r in full["history"]]
    assert full["results"]["reference policy (before)"] == rest["results"]["reference policy (before)"]
    rows = lambda run: [{k: r[k] for k in ("step", *keys)}  # noqa: E731
                        for r in map(json.loads, (tmp_path / run / "metrics.jsonl").read_text().splitlines())]
    assert rows("cut") == rows("full") and [r["step"] for r in rows("full")] == [1, 2, 3, 4]
    eval_json = json.loads((tmp_path / "full" / "eval.json").read_text())
    assert "gold_gain_in_std" in eval_json and (tmp_path / "full" / "ppo.png").is_file()
    if full["results"]["reference policy (before)"]["gold_score_std"] > 0:
        assert math.isfinite(eval_json["gold_gain_stderr"]) and eval_json["gold_gain_stderr"] >= 0
    else:  # every reference sample judged alike (it happens on the generated stand-in text): no sd to measure in
        assert math.isnan(eval_json["gold_gain_in_std"]) and math.isnan(eval_json["gold_gain_stderr"])


def test_gold_gain_and_its_paired_standard_error():
    sd = (1 / 3) ** 0.5   # sample std of [0, 1, 0, 1]; the per-prompt differences [1, 0, 1, 0] have the same
    before = {"gold_score": 0.5, "gold_score_std": sd, "gold_per_prompt": [0.0, 1.0, 0.0, 1.0]}
    after = {"gold_score": 1.0, "gold_per_prompt": [1.0, 1.0, 1.0, 1.0]}
    gain, stderr = score_gain(before, after)
    assert gain == pytest.approx(0.5 / sd) and stderr == pytest.approx((sd / 4 ** 0.5) / sd)
    flat = {"gold_score": 0.0, "gold_score_std": 0.0, "gold_per_prompt": [0.0, 0.0]}  # nothing to measure a gain in
    assert all(math.isnan(x) for x in score_gain(flat, {"gold_score": 0.5, "gold_per_prompt": [0.5, 0.5]}))


def test_ppo_cli_with_a_prompts_file(ppo_setup, tmp_path):
    base, d, _ = ppo_setup
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": f"question {i}:"}) for i in range(5)))
    out = cli.main(["ppo", "--init", str(base), "--reward", str(d / "rm" / "last.pt"), "--prompts", str(prompts),
                      "--steps", "1", "--prompts-per-iter", "4", "--minibatch-size", "2", "--max-new-tokens", "6",
                      "--ppo-epochs", "1", "--eval-prompts", "3", "--best-of", "0", "--checkpoint-dir",
                      str(tmp_path / "ppo"), "--quiet"])
    after = out["results"]["trained policy (after)"]
    assert out["final_step"] == 1 and after["rm_score"] == after["rm_score"]  # ran, and scored (not NaN)
    assert len(out["history"]) == 1 and out["history"][0]["response_tokens"] > 0
    prompts.write_text(json.dumps({"question": "no prompt field"}))
    with pytest.raises(ValueError, match=r"prompts.jsonl:1: missing field 'prompt'"):
        cli.main(["ppo", "--init", str(base), "--reward", str(d / "rm" / "last.pt"), "--prompts", str(prompts),
                    "--checkpoint-dir", str(tmp_path / "ppo2"), "--quiet"])


def test_heldout_script_scores_finished_runs_on_one_prompt_set(ppo_setup, tmp_path):
    import importlib.util
    spec = importlib.util.spec_from_file_location("ppo_heldout", "scripts/ppo_heldout.py")
    heldout = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(heldout)
    for seed in ("0", "1"):
        cli.main(ppo_args(*ppo_setup, tmp_path / seed, "--steps", "1", "--seed", seed))
    rows = heldout.main([str(tmp_path / s / "last.pt") for s in ("0", "1")] + ["--prompts", "6"])
    assert [r["name"].split(" ")[0] for r in rows] == ["the", "reference", "PPO", "PPO"]
    reference = rows[1]
    assert reference["kl"] == 0.0 and len(reference["gold_per_prompt"]) == 6
    for r in rows[2:]:
        gain, stderr = r["gain"]
        if reference["gold_score_std"] > 0:
            assert gain == pytest.approx((r["gold_score"] - reference["gold_score"]) / reference["gold_score_std"])
            assert stderr >= 0
        else:  # every reference sample judged alike (it happens on the generated stand-in text)
            assert math.isnan(gain) and math.isnan(stderr)
        assert math.isfinite(r["kl"])  # a sampled KL estimate, may dip below 0


def test_ppo_cli_refuses_too_few_held_out_prompts(ppo_setup, tmp_path):
    args = ppo_args(*ppo_setup, tmp_path / "run", "--steps", "1")
    args[args.index("--eval-prompts") + 1] = "1"
    with pytest.raises(ValueError, match="--eval-prompts 1: .* at least 2"):
        cli.main(args)


@pytest.mark.parametrize("name,value", [("top_k", 20), ("top_p", 0.95)])
def test_top_k_and_top_p_are_refused_with_the_reason(name, value):
    """A token sampled inside a top-k/top-p filter can fall outside it after one update (log-prob -inf, KL and
    ratio infinite), so PPO samples from the full temperature-scaled distribution and says so."""
    with pytest.raises(ConfigError, match=f"{name} = {value}: PPO samples from the full temperature-scaled"):
        PPOConfig(**{name: value})


def test_the_filtered_sampling_that_was_refused_gives_infinite_log_probs():
    """Why: under top-k the rollout's own distribution gives a sampled token probability > 0, but the same filter at
    slightly different logits (the weights after one update) excludes it."""
    from palm_rlhf.sampling import process_logits
    before = torch.tensor([[3.0, 2.0, 1.0, 0.9]])
    after = torch.tensor([[3.0, 2.0, 0.9, 1.0]])   # a small change swaps the 3rd and 4th tokens
    token = 2                                      # sampled inside the top-3 before the update
    assert process_logits(before, 1.0, k=3)[0, token].isfinite()
    assert process_logits(after, 1.0, k=3)[0, token] == float("-inf")


@pytest.mark.parametrize("normalize", [False, True])
def test_dense_reward_credits_the_same_total_to_the_tokens_that_earned_it(base, normalize):
    """dense_reward: a summed reward model's per-token scores are the rewards, the rest (bias; with normalising, the
    running mean) at the last token; per rollout the rewards add up to exactly what the sparse reward gives."""
    from palm_rlhf import RewardModel
    torch.manual_seed(1)
    rm = RewardModel(PaLM.load(base), pool="sum")
    torch.nn.init.normal_(rm.head.weight, std=0.5)
    torch.nn.init.constant_(rm.head.bias, 0.3)
    memories = []
    for dense in (False, True):
        torch.manual_seed(0)
        trainer = PPOTrainer(ActorCritic(PaLM.load(base), lora=LoRAConfig(r=4)), rm, config=PPOConfig(
            prompts_per_iter=8, minibatch_size=4, max_new_tokens=12, seed=0, dense_reward=dense,
            normalize_reward=normalize, reward_clip=0))
        memories.append(trainer.rollout(prompts(8)))
    sparse, dense = memories
    assert torch.equal(sparse.sequences, dense.sequences) and torch.equal(sparse.scores, dense.scores)
    torch.testing.assert_close(dense.rewards.sum(1), sparse.rewards.sum(1), rtol=0, atol=1e-5)
    assert (sparse.rewards[:, :-1] == 0).all() and (dense.rewards[:, :-1] != 0).float().mean() > 0.9
    with pytest.raises(ValueError, match="summed scalar reward model"):
        PPOTrainer(ActorCritic(PaLM.load(base), lora=LoRAConfig(r=4)), count_reward,
                   config=PPOConfig(prompts_per_iter=8, minibatch_size=4, dense_reward=True))
