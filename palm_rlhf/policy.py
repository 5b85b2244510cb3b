"""The policy side of RLHF: actor, critic and reference policy on one PaLM (InstructGPT,
https://arxiv.org/abs/2203.02155: the KL penalty is taken against the frozen starting policy, the value function
starts from the reward model)."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from .checkpoint import Checkpointable, register
from .lora import LoRAConfig, add_trainable_lora, keep_scopes, lora_parameters, use_lora
from .palm import PaLM, PaLMConfig, disable_dropout
from .reward import RewardModel


@register("policy")
class Policy(Checkpointable, nn.Module):
    """A trainable policy and its frozen reference on one PaLM: what DPO and critic-free RL train.

    LoRA (the default): the policy is a LoRA scope on the base (frozen on construction), the reference is the base
    with the adapters switched off (no second copy). Full fine-tuning (LoRAConfig(r=0)): the policy is the PaLM
    itself, the reference a frozen copy. `PaLM.policy_of(policy)`, or `PaLM.load` of its file, gives the trained
    policy as a plain PaLM."""

    def __init__(self, palm: PaLM, *, lora: LoRAConfig = LoRAConfig(), scope: str = "policy"):
        super().__init__()
        self.palm = disable_dropout(palm)  # the policy's log-probs at rollout, update and reference must agree
        self.lora_config = lora if lora.enabled else None
        self.lora = lora.enabled
        self.scope = scope
        if self.lora:
            add_trainable_lora(palm, scope, lora)
        self.reference = None if self.lora else copy.deepcopy(palm).requires_grad_(False)

    def config_dict(self) -> dict:
        lora = self.lora_config.to_dict() if self.lora else None
        return {"kind": self.kind, "model": self.palm.config.to_dict(), "lora": lora, "scope": self.scope,
                "policy": {"prefix": "palm.", "scope": self.scope if self.lora else None, "lora": lora}}

    @classmethod
    def from_config_dict(cls, config: dict) -> "Policy":
        lora = LoRAConfig(**config["lora"]) if config.get("lora") else LoRAConfig(r=0)
        return cls(PaLM(PaLMConfig.from_dict(config["model"])), lora=lora, scope=config.get("scope", "policy"))

    def own_parameters(self) -> list[nn.Parameter]:
        """The policy's adapter (LoRA) or the whole PaLM; never the reference, nor another wrapper's adapter."""
        return lora_parameters(self.palm, self.scope) if self.lora else list(self.palm.parameters())

    def weights(self) -> dict[str, Tensor]:
        return keep_scopes(self.full_state_dict(), [self.scope])  # not another wrapper's scope on a shared trunk

    def actor_logits(self, tokens: Tensor, mask: Tensor) -> Tensor:
        with self.generation_context():
            return self.palm(tokens, mask=mask)

    @torch.no_grad()
    def reference_logits(self, tokens: Tensor, mask: Tensor) -> Tensor:
        with use_lora(self.palm):
            return self.palm(tokens, mask=mask) if self.lora else self.reference(tokens, mask=mask)

    def forward(self, tokens: Tensor, mask: Tensor) -> Tensor:
        return self.actor_logits(tokens, mask)

    def generation_context(self):
        """Context in which self.palm is the policy (adapters off but the policy's; with full fine-tuning, all off)."""
        return use_lora(self.palm, self.scope) if self.lora else use_lora(self.palm)

    def sampling_model(self, policy: str = "actor"):
        """(model, context) to sample from the trained policy ("actor") or the reference policy."""
        if policy == "actor":
            return self.palm, self.generation_context()
        if policy != "reference":
            raise ValueError(f"policy must be 'actor' or 'reference', got {policy!r}")
        return (self.palm, use_lora(self.palm)) if self.lora else (self.reference, use_lora(self.reference))


@register("actor_critic")
class ActorCritic(Policy):
    """Actor, critic and reference on one base PaLM.

    LoRA (the default): the base weights are frozen (on construction) and shared; the actor and the critic are two
    LoRA scopes, the reference policy is the base with both switched off (no second copy). The same base may also
    carry a RewardModel's scope: one trunk for all four roles (see PPOTrainer). Full fine-tuning (LoRAConfig(r=0)):
    the actor is the PaLM itself, the critic trunk a trainable copy, the reference a frozen copy.
    forward() runs actor and critic in one call, so DDP sees one forward per backward.
    `PaLM.policy_of(ac)`, or `PaLM.load` of its file, gives the actor as a plain PaLM.
    """

    fsdp_methods = ("values",)  # entry points besides forward that use the value head (see fsdp.shard)

    def __init__(self, palm: PaLM, *, lora: LoRAConfig = LoRAConfig()):
        super().__init__(palm, lora=lora, scope="actor")
        if self.lora:
            add_trainable_lora(palm, "critic", lora)
        self.critic_trunk = None if self.lora else copy.deepcopy(palm)
        self.value_head = nn.Linear(palm.config.dim, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    @classmethod
    def from_config_dict(cls, config: dict) -> "ActorCritic":
        lora = LoRAConfig(**config["lora"]) if config.get("lora") else LoRAConfig(r=0)
        return cls(PaLM(PaLMConfig.from_dict(config["model"])), lora=lora)

    def own_parameters(self) -> list[nn.Parameter]:
        """Actor and critic: their adapters and the value head (LoRA), or the actor, the critic trunk and the value
        head (full fine-tuning); never the reference policy, nor another wrapper's adapter on a shared base."""
        if self.lora:
            trunk = lora_parameters(self.palm, "actor") + lora_parameters(self.palm, "critic")
        else:
            trunk = list(self.palm.parameters()) + list(self.critic_trunk.parameters())
        return trunk + list(self.value_head.parameters())

    def weights(self) -> dict[str, Tensor]:
        return keep_scopes(self.full_state_dict(), ["actor", "critic"])  # not a reward scope on a shared trunk

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

    def values(self, tokens: Tensor, mask: Tensor) -> Tensor:
        if self.lora:
            with use_lora(self.palm, "critic"):
                hidden = self.palm(tokens, mask=mask, return_hidden=True)
        else:
            hidden = self.critic_trunk(tokens, mask=mask, return_hidden=True)
        return self.value_head(hidden).squeeze(-1).clone()  # not a view: a sharded (FSDP) root warns on views

    def forward(self, tokens: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        return self.actor_logits(tokens, mask), self.values(tokens, mask)

