"""LoRA: low-rank adapters, several named scopes on one model (https://arxiv.org/abs/2106.09685).

    add_lora(model, "actor", r=8)          # wraps the fused projection and attention output of every block
    add_lora(model, "critic", r=8)         # a second, independent adapter on the same base weights
    with use_lora(model, "actor"):          # only the actor's adapter is on inside the block
        logits = model(tokens)
    logits_ref = model(tokens)             # outside any block: no adapter = the frozen base (reference policy)
    merge_lora(model, "actor")             # fold the adapter into the base weights and drop it

One freezing rule, used by every wrapper that trains adapters (SFT, the reward model, the actor-critic):
`add_trainable_lora` adds the scope and freezes the *base* weights (every parameter that is not an adapter).
Other scopes' adapters are never touched, so several wrappers can share one base model in any order.

Adapted layers keep their parameter names (`...to_fused.weight`), so base checkpoints load unchanged; each scope
adds `...to_fused.lora_A.<scope>` and `...lora_B.<scope>`. B starts at zero, so a new adapter changes nothing.

Without autograd (sampling, scoring, PPO rollouts) an adapted layer runs one matmul with W + sum(B A * alpha / r),
built once per `use_lora` block and rebuilt whenever a weight changes in place (an optimizer step), instead of the
base matmul plus two low-rank ones per call: the KV-cached sampler calls each layer once per token. Set
`LoRALinear.merge_without_grad = False` to turn this off (it holds one merged copy of each adapted weight while a
block is open).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from .utils import option, require

DEFAULT_TARGETS = ("to_fused", "attn_out")


@dataclass(frozen=True)
class LoRAConfig:
    """Low-rank adapters for a fine-tuning stage; r = 0 fine-tunes every weight instead."""
    r: int = option(8, "LoRA rank (0 = no adapters: fine-tune every weight)")
    alpha: float = option(16.0, "LoRA scale numerator: the update is B A * alpha / r")
    targets: tuple[str, ...] = option(DEFAULT_TARGETS, "names of the adapted nn.Linear layers")

    def __post_init__(self):
        require(self.r >= 0, self, "r", "must be >= 0 (0 = no adapters, full fine-tuning)")
        require(self.alpha > 0, self, "alpha", "must be > 0")
        object.__setattr__(self, "targets", tuple(self.targets))

    @property
    def enabled(self) -> bool:
        return self.r > 0

    def to_dict(self) -> dict:
        return {**asdict(self), "targets": list(self.targets)}


class LoRALinear(nn.Linear):
    """nn.Linear (sharing the original weight) plus named low-rank adapters, each switched on or off."""

    merge_without_grad = True

    def __init__(self, base: nn.Linear):
        super().__init__(base.in_features, base.out_features, bias=False, device=base.weight.device,
                         dtype=base.weight.dtype)
        self.weight = base.weight
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.scales: dict[str, float] = {}
        self.active: tuple[str, ...] = ()
        self._merged: tuple | None = None     # (key, W + deltas of the active scopes), see merged_weight

    def add(self, scope: str, r: int, alpha: float) -> None:
        if scope in self.lora_A:
            raise ValueError(f"LoRA scope {scope!r} already exists on this layer")
        a = torch.empty(r, self.in_features, device=self.weight.device, dtype=self.weight.dtype)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.lora_A[scope] = nn.Parameter(a)
        self.lora_B[scope] = nn.Parameter(torch.zeros(self.out_features, r, device=a.device, dtype=a.dtype))
        self.scales[scope] = alpha / r

    def delta(self, scope: str) -> Tensor:
        return (self.lora_B[scope] @ self.lora_A[scope]) * self.scales[scope]

    def merged_weight(self) -> Tensor:
        """W plus the active adapters, cached until a scope switch or an in-place update of any of the weights."""
        tensors = [self.weight] + [t for s in self.active for t in (self.lora_A[s], self.lora_B[s])]
        key = (self.active, tuple((id(t), t._version) for t in tensors))
        if self._merged is None or self._merged[0] != key:
            with torch.no_grad():
                self._merged = (key, self.weight + sum(self.delta(s) for s in self.active))
        return self._merged[1]

    def forward(self, x: Tensor) -> Tensor:
        if self.active and self.merge_without_grad and not torch.is_grad_enabled():
            return nn.functional.linear(x, self.merged_weight())
        out = super().forward(x)
        rows, acc = x.reshape(-1, x.shape[-1]), out.view(-1, out.shape[-1])
        for scope in self.active:
            # out += (x A^T) B^T * scale inside one GEMM, in place (autograd saved x and W, not out), so the (rows, out)
            # product is never written on its own: ~12% less time forward + backward for the fused projection. In
            # place, autocast leaves the dtypes to us: out's (e.g. bf16).
            acc.addmm_((rows @ self.lora_A[scope].t()).to(acc.dtype), self.lora_B[scope].t().to(acc.dtype),
                       alpha=self.scales[scope])
        return out


def lora_layers(model: nn.Module) -> list[LoRALinear]:
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def add_lora(model: nn.Module, scope: str, r: int = LoRAConfig.r, alpha: float = LoRAConfig.alpha,
             targets: tuple[str, ...] = LoRAConfig.targets) -> list[nn.Parameter]:
    """Add adapter `scope` to every Linear whose attribute name is in `targets`; returns its parameters."""
    if r < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {r}")
    found = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if name not in targets or not isinstance(child, nn.Linear):
                continue
            if not isinstance(child, LoRALinear):
                child = LoRALinear(child)
                setattr(parent, name, child)
            child.add(scope, r, alpha)
            found += 1
    if found == 0:
        raise ValueError(f"no nn.Linear named one of {targets} in the model; pass targets= with the layer names")
    return lora_parameters(model, scope)


def freeze_base(model: nn.Module) -> None:
    """Freeze every parameter of `model` that is not a LoRA adapter (adapters keep their requires_grad)."""
    adapters = {id(p) for layer in lora_layers(model) for d in (layer.lora_A, layer.lora_B) for p in d.values()}
    for p in model.parameters():
        if id(p) not in adapters:
            p.requires_grad_(False)


def add_trainable_lora(model: nn.Module, scope: str, config: LoRAConfig) -> list[nn.Parameter]:
    """The freezing rule: add adapter `scope` (trainable) and freeze the base weights; other scopes keep theirs."""
    params = add_lora(model, scope, r=config.r, alpha=config.alpha, targets=config.targets)
    freeze_base(model)
    return params


def adapter_configs(model: nn.Module) -> dict[str, dict]:
    """{scope: LoRAConfig as a dict} of every adapter on `model` (enough to add them again before loading weights)."""
    out = {}
    for layer_name, layer in model.named_modules():
        if isinstance(layer, LoRALinear):
            for scope, a in layer.lora_A.items():
                entry = out.setdefault(scope, {"r": a.shape[0], "alpha": layer.scales[scope] * a.shape[0],
                                               "targets": []})
                name = layer_name.rsplit(".", 1)[-1]
                if name not in entry["targets"]:
                    entry["targets"].append(name)
    return out


def keep_scopes(state: dict, scopes) -> dict:
    """A state dict without the adapters of scopes other than `scopes` (e.g. a wrapper saving only its own)."""
    keep = set(scopes)
    def foreign(key: str) -> bool:
        for part in (".lora_A.", ".lora_B."):
            if part in key:
                return key.split(part, 1)[1].split(".")[0] not in keep
        return False
    return {k: v for k, v in state.items() if not foreign(k)}


def lora_parameters(model: nn.Module, scope: str) -> list[nn.Parameter]:
    params = [p for layer in lora_layers(model) if scope in layer.lora_A
              for p in (layer.lora_A[scope], layer.lora_B[scope])]
    if not params:
        raise ValueError(f"the model has no LoRA scope {scope!r}; add it with add_lora(model, {scope!r})")
    return params


def weight_of(linear: nn.Linear) -> Tensor:
    """The weight a linear layer multiplies by without autograd: its own, or with its active adapters merged."""
    return linear.merged_weight() if isinstance(linear, LoRALinear) and linear.active else linear.weight


def lora_scopes(model: nn.Module) -> set[str]:
    return {scope for layer in lora_layers(model) for scope in layer.lora_A}


def set_lora(model: nn.Module, *scopes: str) -> None:
    """Switch on exactly these scopes (none: the base model)."""
    unknown = set(scopes) - lora_scopes(model)
    if unknown:
        raise ValueError(f"unknown LoRA scope(s) {sorted(unknown)}; the model has {sorted(lora_scopes(model))}")
    for layer in lora_layers(model):
        layer.active = tuple(s for s in scopes if s in layer.lora_A)


@contextmanager
def use_lora(model: nn.Module, *scopes: str):
    """Switch on `scopes` inside the block (no scopes: the base model), restoring what was on before."""
    before = [layer.active for layer in lora_layers(model)]
    set_lora(model, *scopes)
    try:
        yield model
    finally:
        for layer, active in zip(lora_layers(model), before):
            layer.active = active
            layer._merged = None  # free the merged copy


@torch.no_grad()
def merge_lora(model: nn.Module, scope: str) -> None:
    """Fold adapter `scope` into the base weights (W += B A * alpha / r) and remove it."""
    lora_parameters(model, scope)  # raises if missing
    for layer in lora_layers(model):
        if scope in layer.lora_A:
            layer.weight += layer.delta(scope)
            del layer.lora_A[scope], layer.lora_B[scope], layer.scales[scope]
            layer.active = tuple(s for s in layer.active if s != scope)
