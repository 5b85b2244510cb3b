"""Sharded training with PyTorch FSDP2 (`torch.distributed.fsdp.fully_shard`): parameters, gradients and optimizer
state split across processes, each process holding 1/N of them between uses.

The engine is PyTorch's; accelerate still launches the processes, places devices, autocasts and runs backward.
`Trainer.prepare` calls `shard(model)` when the run asks for it (`--fsdp`, or an accelerate config whose
distributed type is FSDP) instead of handing the model to accelerate's DDP wrapper. Why not
accelerate's own FSDP wrapping: accelerate 1.15 turns FSDP on for GPUs only (on CPU it silently falls back to DDP,
so it could not be tested here), and its root unit is gathered by forward alone, while our wrappers also reach their
heads through other methods (`ActorCritic.values`).

Units: every transformer block, each PaLM (token embedding, tied output, final norm), then the model itself (what
is left: reward / value / Q heads, segment embeddings), gathered by its forward and by the methods a class lists in
`fsdp_methods` (e.g. `ActorCritic.values`, `PaLM.to_logits`). LoRA adapters live inside the blocks'
linears and are sharded with their block; the frozen base and the trainable adapters share a unit (FSDP2 shards
per parameter and reduce-scatters only the gradients there are).

Files: a checkpoint holds the *full* (gathered) weights and optimizer state keyed by parameter name, written by the
main process: it resumes under any number of processes (sharded or not) and `PaLM.load` reads it like any other.
Gathering costs one full copy in the main process's CPU memory at save time: fine up to a few billion parameters.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


def is_sharded(model: nn.Module | list) -> bool:
    """Whether a model (or a list of parameters) holds FSDP-sharded parameters (DTensors)."""
    from torch.distributed.tensor import DTensor
    return any(isinstance(p, DTensor) for p in (model.parameters() if isinstance(model, nn.Module) else model))


def shard(model: nn.Module) -> nn.Module:
    """fully_shard `model` in place, unit by unit (see the module docstring). Needs an initialised process group
    (torchrun / accelerate launch) with at least 2 processes."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method

    from .palm import PaLM, ParallelTransformerBlock

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        raise RuntimeError("FSDP shards a model across processes: launch 2 or more (torchrun --nproc_per_node N, or "
                           "accelerate launch --num_processes N), or drop --fsdp to train in one process")
    blocks = [m for m in model.modules() if isinstance(m, ParallelTransformerBlock)]
    palms = [m for m in model.modules() if isinstance(m, PaLM)]
    for m in blocks + palms:
        fully_shard(m, reshard_after_forward=True)   # freed after forward, gathered again for backward
    if not isinstance(model, FSDPModule):   # the root: whatever is left (heads, segment embeddings)
        fully_shard(model, reshard_after_forward=True)   # (gathered() holds every unit for sampling)
    for m in [model, *palms, *blocks]:   # entry points other than forward that use a unit's weights
        for name in getattr(m, "fsdp_methods", ()):
            register_fsdp_forward_method(m, name)
    # FSDP2 picks its root unit by which runs forward first; our wrappers often call their PaLM directly (sampling,
    # actor_logits), which would make the PaLM the root. Settle it now (torch has no public call for this yet).
    model._get_fsdp_state()._lazy_init()
    return model


def fsdp_units(model: nn.Module) -> list:
    from torch.distributed.fsdp import FSDPModule
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextmanager
def gathered(model: nn.Module):
    """Inside: every unit's full parameters stay gathered (one all-gather per unit on entry, none per forward), as
    sampling wants (64 decode steps would otherwise gather every block 64 times); resharded on exit. A no-op for an
    unsharded model. Costs the full model's parameters in memory while inside."""
    units = fsdp_units(model)
    for m in units:
        m.unshard()
        m.set_reshard_after_forward(False)
    try:
        yield model
    finally:
        for m in units:
            m.set_reshard_after_forward(True)
            m.reshard()


def full_state_dict(model: nn.Module) -> dict:
    """The gathered state dict (plain CPU tensors) in the main process, {} elsewhere. A collective: every process
    calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state_dict(model: nn.Module, state: dict, strict: bool = True) -> None:
    """Every process passes the full state dict; each keeps its shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=strict))


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer state gathered and keyed by parameter name (main process; {} elsewhere). A collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    return get_optimizer_state_dict(model, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a name-keyed full optimizer state (from full_optimizer_state) into a sharded or plain model's optimizer."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
