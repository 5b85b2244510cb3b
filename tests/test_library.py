"""The library composed by hand: objects that own their files, one trunk shared by the reward model and the
actor-critic, old checkpoints, and the README's "Use it as a library" block, executed as written."""

import re
from pathlib import Path

import pytest
import torch

import palm_rlhf
from palm_rlhf import (ActorCritic, LoRAConfig, PaLM, PaLMConfig, PPOConfig, PPOTrainer, RewardConfig, RewardModel,
                       RewardTrainer)
from palm_rlhf.checkpoint import read_model

README = Path(__file__).resolve().parent.parent / "README.md"


def tiny_palm(seed=0) -> PaLM:
    torch.manual_seed(seed)
    return PaLM(PaLMConfig.preset("test"))


def perturb(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def test_readme_library_example_runs_as_written(tmp_path, monkeypatch):
    block = re.search(r"<!-- library-example -->\s*```python\n(.*?)```", README.read_text(), re.S)
    assert block, "README.md lost its library example"
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(block.group(1), "README.md", "exec"), namespace)
    ppo_summary = namespace["summary"]
    assert ppo_summary["final_step"] == 2 and "trained policy (after)" in ppo_summary["results"]
    assert isinstance(palm_rlhf.load(tmp_path / "checkpoints" / "ppo" / "model"), PaLM)


@pytest.mark.parametrize("order", ["actor-critic first", "reward model first", "reward model trained in between"])
def test_a_shared_trunk_trains_actor_and_critic_and_leaves_the_reward_model_alone(order, tmp_path):
    """One PaLM carries the actor, the critic, the reference (adapters off) and the reward model (its own scope)."""
    palm = tiny_palm()
    if order == "reward model first":
        rm = RewardModel(palm, lora=LoRAConfig(r=4))
        ac = ActorCritic(palm, lora=LoRAConfig(r=4))
    else:
        ac = ActorCritic(palm, lora=LoRAConfig(r=4))
        rm = RewardModel(palm, lora=LoRAConfig(r=4))
    if order == "reward model trained in between":  # its trainer freezes everything on the trunk but the reward model
        RewardTrainer(rm, [{"prompt": "p", "chosen": "a", "rejected": "b"}] * 8,
                      RewardConfig(steps=1, batch_size=2, cpu=True, quiet=True, checkpoint_dir=str(tmp_path))).train()
    perturb(rm.head, 1)  # a reward model that says something
    base = {n: p.detach().clone() for n, p in palm.named_parameters() if ".lora_" not in n}
    rm_before = [p.detach().clone() for p in rm.own_parameters()]
    trainer = PPOTrainer(ac, rm, config=PPOConfig(prompts_per_iter=4, minibatch_size=2, max_new_tokens=6,
                                                  ppo_epochs=2, lr=1e-2, cpu=True))  # 4 updates: B, then A moves
    actor_critic_params = {id(p) for p in trainer.params}
    assert {id(p) for p in ac.palm.parameters() if p.requires_grad} <= actor_critic_params
    before = [p.detach().clone() for p in trainer.params]
    trainer.step([torch.tensor([104, 105, 32]), torch.tensor([97, 98])] * 2)
    moved = [not torch.equal(a, p) for a, p in zip(before, trainer.params)]
    assert all(moved), f"{moved.count(False)} of {len(moved)} actor/critic tensors did not train"
    for a, p in zip(rm_before, rm.own_parameters()):
        assert torch.equal(a, p) and not p.requires_grad          # the reward model is frozen, not the policy
    for n, p in palm.named_parameters():
        if ".lora_" not in n:
            assert torch.equal(base[n], p)                          # the shared base never moves


def test_a_shared_trunk_without_lora_is_refused():
    palm = tiny_palm()
    ac = ActorCritic(palm, lora=LoRAConfig(r=0))
    rm = RewardModel(palm, lora=LoRAConfig(r=4))
    with pytest.raises(ValueError, match="share one PaLM, which works only when both use LoRA"):
        PPOTrainer(ac, rm, config=PPOConfig(cpu=True))
    palm = tiny_palm()
    ac = ActorCritic(palm, lora=LoRAConfig(r=4))
    with pytest.raises(ValueError, match="share one PaLM"):
        PPOTrainer(ac, RewardModel(palm, lora=LoRAConfig(r=0)), config=PPOConfig(cpu=True))


def test_objects_rebuild_from_their_files_alone(tmp_path):
    tokens = torch.randint(0, 256, (2, 9))
    mask, response = torch.ones_like(tokens, dtype=torch.bool), torch.zeros_like(tokens, dtype=torch.bool)
    response[:, 5:] = True
    palm = tiny_palm()
    rm = RewardModel(tiny_palm(4), lora=LoRAConfig(r=4, alpha=8.0), num_bins=3, bin_values=[0.0, 1.0, 5.0])
    perturb(rm, 2)
    ac = ActorCritic(tiny_palm(1), lora=LoRAConfig(r=2))
    perturb(ac, 3)
    for obj, cls in ((palm, PaLM), (rm, RewardModel), (ac, ActorCritic)):
        path = obj.save(tmp_path / cls.__name__)
        assert path.name == "model.safetensors" and (path.parent / "config.json").is_file()
        for source in (path.parent, path):                        # the folder, or the weights file alone
            again = cls.load(source)
            assert type(again) is cls and type(palm_rlhf.load(source)) is cls
            for name, tensor in obj.weights().items():
                assert torch.equal(again.weights()[name], tensor), name
    torch.testing.assert_close(RewardModel.load(tmp_path / "RewardModel").score(tokens, mask, response),
                               rm.eval().score(tokens, mask, response))
    # the policy inside any file: the actor's adapter merged into a plain PaLM
    policy = PaLM.load(tmp_path / "ActorCritic")
    with torch.no_grad():
        torch.testing.assert_close(policy(tokens), ac.actor_logits(tokens, mask), atol=1e-5, rtol=1e-5)
    assert not any(".lora_" in k for k in policy.state_dict())
    config, _ = read_model(tmp_path / "RewardModel")
    assert config["kind"] == "reward_model"
    assert config["lora"] == {"r": 4, "alpha": 8.0, "targets": ["to_fused", "attn_out"]}


def test_a_reward_model_on_a_shared_trunk_saves_only_its_own_adapter(tmp_path):
    palm = tiny_palm()
    ac = ActorCritic(palm, lora=LoRAConfig(r=4))
    rm = RewardModel(palm, lora=LoRAConfig(r=4))
    assert not any(".actor" in k or ".critic" in k for k in rm.weights())
    assert not any(".reward" in k for k in ac.weights())
    rm.save(tmp_path / "rm")
    assert set(RewardModel.load(tmp_path / "rm").weights()) == set(rm.weights())


def old_format_checkpoint(path, stage, model, extra=None, args=None):
    """A file as palm-rlhf 0.1 wrote it (format 1): config, weights, argparse args and an `extra` dict."""
    torch.save({"format": 1, "stage": stage, "step": 3, "config": model_config(model), "model": model.state_dict(),
                "optimizer": None, "rng": torch.get_rng_state(), "args": args or {}, "extra": extra or {}}, path)
    return path


def model_config(model):
    palm = model if isinstance(model, PaLM) else model.palm
    return palm.config.to_dict()


def test_checkpoints_of_the_previous_format_load_as_models_and_refuse_to_resume(tmp_path):
    palm = tiny_palm()
    old = old_format_checkpoint(tmp_path / "pre.pt", "pretrain", palm)
    assert torch.equal(PaLM.load(old).token_emb.weight, palm.token_emb.weight)
    rm = RewardModel(tiny_palm(1), lora=LoRAConfig(r=4))
    perturb(rm, 4)
    old_rm = old_format_checkpoint(tmp_path / "rm.pt", "reward", rm,
                                   extra={"kind": "reward", "lora_r": 4, "lora_alpha": 16.0, "num_bins": None})
    loaded = RewardModel.load(old_rm)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in rm.state_dict().items())
    ac = ActorCritic(tiny_palm(2), lora=LoRAConfig(r=2))
    perturb(ac, 5)
    old_ac = old_format_checkpoint(tmp_path / "ppo.pt", "ppo", ac, extra={"lora_r": 2, "lora_alpha": 16.0})
    assert all(torch.equal(ActorCritic.load(old_ac).state_dict()[k], v) for k, v in ac.state_dict().items())
    from palm_rlhf.lora import add_lora, set_lora
    sft = tiny_palm(3)
    add_lora(sft, "sft", r=4)
    perturb(sft, 6)
    old_sft = old_format_checkpoint(tmp_path / "sft.pt", "sft", sft, args={"lora_r": 4, "lora_alpha": 16.0})
    tokens = torch.randint(0, 256, (1, 7))
    set_lora(sft.eval(), "sft")
    with torch.no_grad():
        torch.testing.assert_close(PaLM.load(old_sft)(tokens), sft(tokens), atol=1e-5, rtol=1e-5)  # merged
    trainer = RewardTrainer(RewardModel(tiny_palm(), lora=LoRAConfig(r=4)),
                            [{"prompt": "p", "chosen": "a", "rejected": "b"}] * 4,
                            RewardConfig(steps=1, cpu=True, quiet=True, checkpoint_dir=str(tmp_path / "run")))
    with pytest.raises(RuntimeError, match="written by palm-rlhf 0.1 and cannot be resumed.*--init"):
        trainer.train(resume=old_rm)
