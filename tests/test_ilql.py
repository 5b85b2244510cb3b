"""ILQL: each loss term by hand, the Polyak target update, beta = 0 sampling == the plain policy, the heads steer
sampling, a toy offline dataset improved on without sampling, save/load and the CLI."""

import json
import math

import pytest
import torch

from palm_rlhf import LoRAConfig, PaLM, cli
from palm_rlhf.ilql import ILQLConfig, ILQLModel, ILQLSampler, ILQLTrainer, ilql_loss
from palm_rlhf.sampling import generate

from test_ppo import pretrain_toy, prompts


@pytest.fixture(scope="module")
def base(tmp_path_factory, text_file):
    """The 'test' PaLM after 40 pretraining steps (test_ppo's toy), without dropout: the toy ILQL task's margins were
    set on a base trained without it, and on the generated stand-in text a base trained with it misses them."""
    return pretrain_toy(tmp_path_factory, text_file, "dropout=0")


def test_loss_terms_by_hand():
    torch.manual_seed(0)
    tokens = torch.tensor([[0, 2, 1, 2]])                                # prompt 0, response 2 1 2
    response_mask = torch.tensor([[False, True, True, True]])
    out = {"logits": torch.randn(1, 3, 3), "q": [torch.randn(1, 3, 3), torch.randn(1, 3, 3)],
           "target_q": [torch.randn(1, 3, 3), torch.randn(1, 3, 3)], "v": torch.randn(1, 3)}
    gamma, tau, reward = 0.9, 0.7, 2.0
    loss, terms = ilql_loss(out, tokens, response_mask, torch.tensor([reward]), gamma=gamma, tau=tau,
                            cql_scale=0.1, awac_scale=1.0, awac_beta=0.5)
    actions, v = [2, 1, 2], out["v"][0]
    td = cql = exp_ = awac = 0.0
    for t, a in enumerate(actions):                                        # state t (position t) takes action a
        r = reward if t == 2 else 0.0
        target = r + (gamma * v[t + 1].item() if t < 2 else 0.0)
        td += sum((q[0, t, a].item() - target) ** 2 for q in out["q"])
        tq = min(q[0, t, a].item() for q in out["target_q"])
        d = tq - v[t].item()
        exp_ += (tau if d >= 0 else 1 - tau) * d ** 2
        cql += sum(-torch.log_softmax(q[0, t], -1)[a].item() for q in out["q"])
        awac += math.exp(0.5 * d) * -torch.log_softmax(out["logits"][0, t], -1)[a].item()
    expected = {"loss_q": td / 3, "loss_v": exp_ / 3, "loss_cql": cql / 3, "loss_awac": awac / 3}
    for k, value in expected.items():
        assert terms[k] == pytest.approx(value, rel=1e-5), k
    assert loss.item() == pytest.approx(td / 3 + exp_ / 3 + 0.1 * cql / 3 + awac / 3, rel=1e-5)


def tiny_model(seed=0) -> ILQLModel:
    from palm_rlhf import PaLMConfig
    torch.manual_seed(seed)
    return ILQLModel(PaLM(PaLMConfig(num_tokens=256, dim=32, depth=1, heads=2, dim_head=16, max_seq_len=64)),
                     lora=LoRAConfig(r=4))


def test_targets_follow_the_q_heads_by_polyak_averaging():
    model = tiny_model()
    with torch.no_grad():
        for p in model.q_heads.parameters():
            p.add_(1.0)
    before = [p.clone() for p in model.target_q_heads.parameters()]
    model.sync_targets(0.25)
    for q, target, old in zip(model.q_heads.parameters(), model.target_q_heads.parameters(), before):
        torch.testing.assert_close(target, 0.25 * q + 0.75 * old)
    assert not any(p.requires_grad for p in model.target_q_heads.parameters())
    assert {id(p) for p in model.trainable_parameters()}.isdisjoint(id(p) for p in model.target_q_heads.parameters())


def test_beta_zero_samples_the_plain_policy_and_the_heads_steer():
    model = tiny_model()
    with torch.no_grad():                                                 # a policy that is not the base, and heads
        for name, p in model.named_parameters():                          # that are not zero
            if "lora_B" in name or "head" in name:
                p.normal_(0, 0.3)
    ps = [torch.tensor([72, 105, 32]), torch.tensor([116, 104, 101, 32, 99])]
    plain = generate(PaLM.policy_of(model), ps, 16, generator=torch.Generator().manual_seed(3))
    steered = generate(ILQLSampler(model, beta=0.0), ps, 16, generator=torch.Generator().manual_seed(3))
    assert torch.equal(plain.tokens, steered.tokens)
    torch.testing.assert_close(plain.logprobs, steered.logprobs, atol=1e-4, rtol=1e-4)
    with torch.no_grad():                                                 # an advantage of 50 for 'e' everywhere
        for target in model.target_q_heads:
            target[-1].bias[ord("e")] += 50.0
    pushed = generate(ILQLSampler(model, beta=1.0), ps, 16, generator=torch.Generator().manual_seed(3))
    assert (pushed.tokens == ord("e")).all()


def e_share(text: str) -> float:
    return text.count("e") / max(len(text), 1)


@pytest.fixture(scope="module")
def scored(base, tmp_path_factory):  # noqa: F811
    """The toy policy's own samples, scored by their share of 'e' bytes: the offline dataset."""
    policy = PaLM.load(base)
    rows = []
    for seed in range(16):
        ps = prompts(32, seed=100 + seed)
        gen = generate(policy, ps, 24, generator=torch.Generator().manual_seed(seed))
        for p, t, m in zip(ps, gen.tokens, gen.mask):
            response = bytes(t[m].tolist()).decode("utf-8", "replace")
            rows.append({"prompt": bytes(p.tolist()).decode(), "response": response, "reward": e_share(response)})
    path = tmp_path_factory.mktemp("ilql") / "scored.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_toy_offline_data_is_improved_on_without_sampling(base, scored, tmp_path):  # noqa: F811
    torch.manual_seed(0)
    model = ILQLModel(PaLM.load(base), lora=LoRAConfig(r=0))
    cfg = ILQLConfig(steps=150, batch_size=16, lr=1e-3, warmup=10, max_len=40, eval_interval=0, alpha=0.05,
                     betas_eval=("0", "16"), eval_prompts=128, val_fraction=0.25, max_new_tokens=24, quiet=True,
                     checkpoint_dir=str(tmp_path / "run"))
    summary = ILQLTrainer(model, str(scored), cfg, gold_fn=e_share).train()
    gain = summary["gold_over_data_in_std"]
    assert gain["ILQL, beta 16"] > gain["ILQL, beta 0"] + 0.5, gain       # the heads, not the policy, do it
    assert gain["ILQL, beta 16"] > 0.75, gain                              # well above the data's mean
    assert summary["results"]["ILQL, beta 16"]["kl"] > summary["results"]["ILQL, beta 0"]["kl"]
    again = ILQLModel.load(tmp_path / "run" / "model")                     # heads and targets come back
    for a, b in zip(again.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)
    assert isinstance(PaLM.load(tmp_path / "run" / "model"), PaLM)         # and the plain policy for other stages


def test_cli_trains_and_refuses_rows_without_a_reward(base, scored, tmp_path):  # noqa: F811
    summary = cli.main(["ilql", "--init", str(base), "--train", str(scored), "--steps", "2", "--max-len", "40",
                        "--eval-prompts", "4", "--max-new-tokens", "8", "--betas-eval", "0", "1", "--gold", "prose",
                        "--checkpoint-dir", str(tmp_path / "ilql"), "--quiet"])
    assert set(summary["results"]) == {"reference policy (top-k)", "ILQL, beta 0", "ILQL, beta 1"}
    assert (tmp_path / "ilql" / "ilql.png").is_file() and (tmp_path / "ilql" / "eval.json").is_file()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "response": "r"}) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl:1: field 'reward' must be a number"):
        cli.main(["ilql", "--init", str(base), "--train", str(bad), "--steps", "1"])
