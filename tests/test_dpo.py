"""DPO / IPO: the losses by hand, log 2 at the start, learning a toy preference, resume, full fine-tuning, the CLI."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from palm_rlhf import LoRAConfig, PaLM, PaLMConfig, Policy, cli
from palm_rlhf.dpo import DPOConfig, DPOTrainer, dpo_loss, sequence_logprobs
from palm_rlhf.feedback import collate, encode

# a preference a tiny model can learn: the chosen response is polite, the rejected one shouts
PAIRS = [{"prompt": f"Q{i % 7}: ", "chosen": "yes, thank you", "rejected": "NO!! NO!!"} for i in range(64)]


def toy_policy(r: int = 4, seed: int = 0) -> Policy:
    torch.manual_seed(seed)
    return Policy(PaLM(PaLMConfig.preset("test")), lora=LoRAConfig(r=r))


def config(tmp_path, **kw) -> DPOConfig:
    base = dict(steps=30, batch_size=8, lr=3e-3, warmup=2, eval_interval=10, checkpoint_dir=str(tmp_path),
                eval_prompts=4, max_new_tokens=8, quiet=True)
    return DPOConfig(**{**base, **kw})


def test_losses_by_hand():
    pc, pr, rc, rr = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -2.0]), torch.tensor([-3.5, -4.0]), \
        torch.tensor([-3.5, -3.0])
    h = torch.tensor([(-3 + 4) - 0.0, (-5 + 2) - (-4 + 3)])          # [1, -2]
    beta = 0.5
    loss, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta=beta)
    want = -torch.log(torch.sigmoid(beta * h)).mean()
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(chosen, beta * (pc - rc))
    torch.testing.assert_close(rejected, beta * (pr - rr))
    smoothed, _, _ = dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=0.2)
    torch.testing.assert_close(smoothed, (-0.8 * torch.log(torch.sigmoid(beta * h))
                                          - 0.2 * torch.log(torch.sigmoid(-beta * h))).mean())
    ipo, _, _ = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="ipo")
    torch.testing.assert_close(ipo, ((h - 1 / (2 * beta)) ** 2).mean())     # 1 / (2 beta) = 1: [0, 9] -> 4.5
    assert ipo.item() == pytest.approx(4.5)
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="hinge")


def test_sequence_logprobs_count_response_tokens_only():
    torch.manual_seed(0)
    model = PaLM(PaLMConfig.preset("test"))
    b = collate([encode("prompt ", "reply", 64), encode("p", "a longer reply", 64)])
    logits = model(b["tokens"][:, :-1], mask=b["mask"][:, :-1])
    got = sequence_logprobs(logits, b["tokens"], b["response_mask"])
    for i in range(2):
        lp = F.log_softmax(logits[i].float(), -1)
        want = sum(lp[t - 1, b["tokens"][i, t]] for t in range(1, b["tokens"].shape[1]) if b["response_mask"][i, t])
        torch.testing.assert_close(got[i], want)


def test_loss_is_log2_at_the_start_and_the_toy_preference_is_learned(tmp_path):
    trainer = DPOTrainer(toy_policy(), PAIRS, config(tmp_path))
    loss, m = trainer.forward("train", list(range(8)))       # LoRA B = 0: the policy is the reference
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6) and m["margin"] == pytest.approx(0.0, abs=1e-6)
    summary = trainer.train()
    assert summary["val_acc"] == 1.0 and summary["val_loss"] < 0.45 and summary["val_margin"] > 0.5
    before, after = summary["results"]["reference policy (before)"], summary["results"]["trained policy (after)"]
    # sampled KL to the reference: exactly 0 before; after, a k1 estimate from a few samples (unbiased, but it can
    # come out negative), so only "the policy moved" is asserted here; the lines below check which way
    assert before["kl"] == 0.0 and after["kl"] != 0.0
    assert (tmp_path / "model" / "model.safetensors").is_file() and (tmp_path / "dpo.png").is_file()
    # the exported policy is the trained one: it prefers the chosen response more than the reference does
    exported, reference = PaLM.load(tmp_path / "model"), PaLM(PaLMConfig.preset("test"))
    reference.load_state_dict(trainer.policy.palm.state_dict(), strict=False)
    b = collate([encode("Q1: ", "yes, thank you", 64), encode("Q1: ", "NO!! NO!!", 64)])
    margin = lambda m: (lambda lp: (lp[0] - lp[1]).item())(  # noqa: E731
        sequence_logprobs(m(b["tokens"][:, :-1], mask=b["mask"][:, :-1]), b["tokens"], b["response_mask"]))
    with torch.no_grad():
        assert margin(exported) > margin(reference) + 4


def test_ipo_learns_too(tmp_path):
    summary = DPOTrainer(toy_policy(), PAIRS, config(tmp_path, loss_type="ipo", eval_prompts=0)).train()
    assert summary["val_acc"] == 1.0 and "results" not in summary


def test_reference_logprobs_are_computed_once_per_pair(tmp_path, monkeypatch):
    trainer = DPOTrainer(toy_policy(), PAIRS[:10], config(tmp_path, steps=6, eval_prompts=0), val=PAIRS[:2])
    calls = []
    real = trainer.batch_logprobs
    monkeypatch.setattr(trainer, "batch_logprobs", lambda items, reference=False: (
        calls.append(len(items)) if reference else None) or real(items, reference))
    trainer.train()
    cached = sum(int((~torch.isnan(c[:, 0])).sum()) for c in trainer.ref_cache.values())
    assert sum(calls) == cached == 10 + 2  # every training pair and every held-out pair, each exactly once


def test_resume_equals_uninterrupted(tmp_path):
    full = DPOTrainer(toy_policy(), PAIRS, config(tmp_path / "full", steps=8, eval_interval=4)).train()
    DPOTrainer(toy_policy(), PAIRS, config(tmp_path / "cut", steps=8, eval_interval=4, stop_after=4)).train()
    rest = DPOTrainer(toy_policy(seed=1), PAIRS, config(tmp_path / "cut", steps=8, eval_interval=4)).train(
        resume="auto")
    assert full["losses"][4:] == rest["losses"] and full["results"] == rest["results"]
    a = PaLM.load(tmp_path / "full" / "model").state_dict()
    b = PaLM.load(tmp_path / "cut" / "model").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_full_fine_tuning_keeps_a_frozen_reference(tmp_path):
    policy = toy_policy(r=0)
    start = {k: v.clone() for k, v in policy.palm.state_dict().items()}
    summary = DPOTrainer(policy, PAIRS, config(tmp_path, steps=10, lr=1e-3, eval_prompts=0)).train()
    assert summary["val_acc"] == 1.0
    assert all(torch.equal(policy.reference.state_dict()[k], start[k]) for k in start)
    assert any(not torch.equal(policy.palm.state_dict()[k], start[k]) for k in start)


def test_policy_saves_and_loads(tmp_path):
    policy = toy_policy()
    for p in policy.own_parameters():
        torch.nn.init.normal_(p, std=0.1)
    policy.save(tmp_path / "p")
    again = Policy.load(tmp_path / "p")
    tokens = torch.randint(0, 256, (2, 12))
    mask = torch.ones_like(tokens, dtype=torch.bool)
    torch.testing.assert_close(again.actor_logits(tokens, mask), policy.actor_logits(tokens, mask))
    torch.testing.assert_close(PaLM.load(tmp_path / "p")(tokens, mask=mask), policy.actor_logits(tokens, mask),
                               atol=1e-5, rtol=1e-5)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="beta"):
        DPOConfig(beta=0)
    with pytest.raises(ValueError, match="label_smoothing"):
        DPOConfig(loss_type="ipo", label_smoothing=0.1)


def test_dpo_cli_with_a_gold_judge(tmp_path):
    base = tmp_path / "base"
    torch.manual_seed(0)
    PaLM(PaLMConfig.preset("test")).save(base)
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text("\n".join(json.dumps(p) for p in PAIRS))
    summary = cli.main(["dpo", "--init", str(base), "--train", str(prefs), "--steps", "4", "--batch-size", "4",
                        "--eval-prompts", "3", "--max-new-tokens", "8", "--gold", "prose", "--lora-r", "4",
                        "--checkpoint-dir", str(tmp_path / "dpo"), "--quiet"])
    assert "gold_gain_in_std" in summary and "gold_score" in summary["results"]["trained policy (after)"]
    assert json.loads((tmp_path / "dpo" / "eval.json").read_text())["final_step"] == 4
    with pytest.raises(cli.CLIError, match="--beta -1"):
        cli.main(["dpo", "--init", str(base), "--train", str(prefs), "--beta", "-1"])
