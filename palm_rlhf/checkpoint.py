"""Model files and training checkpoints: what they hold, how they are written (atomically) and read (never running
code from the file).

Objects own their files. `PaLM`, `RewardModel` and `ActorCritic` all have `.save(path)` and `Class.load(path)`;
`palm_rlhf.load(path)` returns whichever object a file holds.

    model.save("out/rm")          # out/rm/model.safetensors (the config rides in its header) + out/rm/config.json
    RewardModel.load("out/rm")    # or the .safetensors file alone, or a trainer's checkpoint (last.pt)
    PaLM.load(any_of_them)        # the policy inside any file: a PPO actor or an SFT adapter merged, a reward
                                  # model's trunk without its adapter

A model config is a JSON dict: `kind` (the class: "palm", "reward_model", "actor_critic"), `model` (the PaLMConfig),
`policy` ({"prefix": where the PaLM's weights sit, "scope": the LoRA scope that makes it the policy, or null}) and
whatever else its class needs to rebuild itself. A training checkpoint (`last.pt`, written by the trainers) holds
the same config and weights plus the optimizer, the RNG state, the trainer's config dataclass and state.
Checkpoints of palm-rlhf 0.1 (format 1) still load as models; they cannot be resumed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import Tensor

from .utils import atomic_torch_save, atomic_write, atomic_write_text, safe_torch_load

FORMAT = 2
WEIGHTS_FILE, CONFIG_FILE = "model.safetensors", "config.json"
MODEL_KINDS: dict[str, type] = {}


def register(kind: str):
    """Class decorator: files whose config says `kind` are rebuilt by this class (see `load`)."""
    def wrap(cls):
        cls.kind = kind
        MODEL_KINDS[kind] = cls
        return cls
    return wrap


class Checkpointable:
    """Mixin for nn.Modules that rebuild themselves from a config dict and weights."""
    kind = ""

    def config_dict(self) -> dict:
        raise NotImplementedError

    @classmethod
    def from_config_dict(cls, config: dict):
        raise NotImplementedError

    def own_parameters(self) -> list:
        """The parameters that belong to this object alone (a wrapper on a shared base: not the others' adapters)."""
        return list(self.parameters())

    def trainable_parameters(self) -> list:
        """What a trainer optimises, in module order: the object's own parameters, whatever another trainer on a
        shared base froze in the meantime (PaLM itself: the parameters that require grad)."""
        own = {id(p) for p in self.own_parameters()}
        return [p for p in self.parameters() if id(p) in own]

    def weights(self) -> dict[str, Tensor]:
        """What a file holds of this object (a wrapper on a shared base leaves out other wrappers' adapters)."""
        return self.full_state_dict()

    def full_state_dict(self) -> dict[str, Tensor]:
        """state_dict(), gathered when the model is sharded (FSDP: a collective; the main process gets it, the
        others {})."""
        from .fsdp import full_state_dict, is_sharded
        return full_state_dict(self) if is_sharded(self) else self.state_dict()

    def load_weights(self, weights: dict[str, Tensor], source: str = "the checkpoint") -> None:
        from .fsdp import is_sharded, load_full_state_dict
        try:
            if is_sharded(self):
                load_full_state_dict(self, weights, strict=True)
            else:
                self.load_state_dict(weights, strict=True)
        except (RuntimeError, KeyError, ValueError) as err:
            raise RuntimeError(f"the weights in {source} do not fit this {type(self).__name__}: {err}") from None

    def save(self, path: str | os.PathLike) -> Path:
        """Write model.safetensors (config in its header) and config.json into folder `path` (or to `path` itself
        when it ends in .safetensors). Returns the weights file."""
        return write_model(path, self.config_dict(), self.weights())

    @classmethod
    def load(cls, path: str | os.PathLike):
        """The model in `path`, in eval mode (dropout off); trainers switch to training mode themselves."""
        config, weights = read_model(path)
        return cls.from_file(config, weights, str(path))

    @classmethod
    def from_file(cls, config: dict, weights: dict[str, Tensor], source: str):
        if config["kind"] != cls.kind:
            raise ValueError(f"{source} holds a {config['kind']!r}, not a {cls.kind!r}; load it with "
                             f"palm_rlhf.load(path) or {MODEL_KINDS[config['kind']].__name__}.load(path)")
        obj = cls.from_config_dict(config)
        obj.load_weights(weights, source)
        return obj.eval()


def load(path: str | os.PathLike):
    """The object a model file or training checkpoint holds: a PaLM, a RewardModel or an ActorCritic."""
    config, weights = read_model(path)
    if config["kind"] not in MODEL_KINDS:
        raise ValueError(f"{path} holds a model of kind {config['kind']!r}, which this version of palm-rlhf does "
                         f"not know (known: {sorted(MODEL_KINDS)})")
    return MODEL_KINDS[config["kind"]].from_file(config, weights, str(path))

# ---------------------------------------------------------------------------------------------------- model files


def write_model(path: str | os.PathLike, config: dict, weights: dict[str, Tensor]) -> Path:
    from safetensors.torch import save
    path = Path(path)
    file = path if path.suffix == ".safetensors" else path / WEIGHTS_FILE
    tensors = {k: v.detach().contiguous().cpu() for k, v in weights.items()}
    blob = save(tensors, metadata={"format": "palm-rlhf", "config": json.dumps(config)})
    atomic_write(file, lambda f: f.write(blob))
    if file.name == WEIGHTS_FILE:
        atomic_write_text(json.dumps(config, indent=1) + "\n", file.parent / CONFIG_FILE)
    return file


def read_model(path: str | os.PathLike) -> tuple[dict, dict[str, Tensor]]:
    """(model config, weights) from a model folder, a .safetensors file, or a .pt training checkpoint."""
    path = Path(path)
    if path.is_dir():
        if not (path / WEIGHTS_FILE).is_file():
            raise FileNotFoundError(f"{path} is a folder without {WEIGHTS_FILE}; pass a model folder written by "
                                    f".save(), a .safetensors file, or a checkpoint file such as {path / 'last.pt'}")
        path = path / WEIGHTS_FILE
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    state = safe_torch_load(path)
    if isinstance(state, dict) and state.get("format") == FORMAT and "model_config" in state:
        return state["model_config"], state["model"]
    if isinstance(state, dict) and state.get("format") == 1 and "model" in state:
        return legacy_model_config(state), state["model"]
    raise RuntimeError(f"{path} is not a palm-rlhf checkpoint; pass a file written by palm-rlhf (train.py or .save())")


def _read_safetensors(path: Path) -> tuple[dict, dict[str, Tensor]]:
    from safetensors import SafetensorError, safe_open
    if not path.is_file():
        raise FileNotFoundError(f"model file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            weights = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as err:
        raise RuntimeError(f"could not read {path}: it is truncated or not a safetensors file ({err})") from None
    if "config" in metadata:
        return json.loads(metadata["config"]), weights
    beside = path.parent / CONFIG_FILE
    if beside.is_file():
        return json.loads(beside.read_text()), weights
    raise RuntimeError(f"{path} has no palm-rlhf config in its header and no {CONFIG_FILE} beside it")


def legacy_model_config(state: dict) -> dict:
    """The model config of a format-1 checkpoint (palm-rlhf 0.1): its stage, PaLMConfig, CLI args and extras."""
    stage, args, extra = state.get("stage"), state.get("args", {}), state.get("extra", {})
    targets = ["to_fused", "attn_out"]  # the layers 0.1 adapted, whatever the defaults are today
    palm = {"kind": "palm", "model": state["config"], "adapters": {}, "policy": {"prefix": "", "scope": None}}
    if stage == "sft" and any(".lora_A.sft" in k for k in state["model"]):  # an unmerged training state
        lora = {"r": args["lora_r"], "alpha": args["lora_alpha"], "targets": targets}
        palm.update(adapters={"sft": lora}, policy={"prefix": "", "scope": "sft", "lora": lora})
    if stage in ("pretrain", "sft"):
        return palm
    lora = {"r": extra["lora_r"], "alpha": extra["lora_alpha"], "targets": targets} if extra.get("lora_r") else None
    if stage == "reward":
        return {"kind": "reward_model", "model": state["config"], "lora": lora, "scope": "reward",
                "num_bins": extra.get("num_bins"), "bin_values": None, "policy": {"prefix": "palm.", "scope": None}}
    if stage == "ppo":
        return {"kind": "actor_critic", "model": state["config"], "lora": lora,
                "policy": {"prefix": "palm.", "scope": "actor" if lora else None, "lora": lora}}
    raise RuntimeError(f"checkpoint of unknown stage {stage!r}")

# ---------------------------------------------------------------------------------------------------- training state


def save_training_state(path: str | os.PathLike, *, stage: str, step: int, model, weights: dict, optimizer: dict,
                        trainer_config: dict, trainer_state: dict, metadata: dict) -> None:
    """Everything a trainer needs to resume, in one atomically written file of tensors and plain values. weights:
    model.weights(); optimizer: its state keyed by parameter name (`named_optimizer_state`), so that the run
    resumes under another number of processes, sharded or not."""
    atomic_torch_save({
        "format": FORMAT, "stage": stage, "step": step,
        "model_config": model.config_dict(), "model": weights,
        "optimizer": optimizer, "rng": torch.get_rng_state(),
        "trainer_config": trainer_config, "trainer_state": trainer_state, "metadata": metadata,
    }, path)


def read_training_state(path: str | os.PathLike, stage: str) -> dict:
    state = safe_torch_load(path)
    if not isinstance(state, dict) or "format" not in state:
        raise RuntimeError(f"{path} is not a palm-rlhf checkpoint; pass a last.pt written by a trainer")
    if state["format"] == 1:
        raise RuntimeError(f"{path} was written by palm-rlhf 0.1 and cannot be resumed by this version. It still "
                           f"loads as a model: start a new run from it (train.py ... --init {path}).")
    if state["format"] != FORMAT:
        raise RuntimeError(f"{path} has checkpoint format {state['format']}; this version reads format {FORMAT}")
    if state["stage"] != stage:
        raise RuntimeError(f"{path} is a '{state['stage']}' checkpoint, but this is the '{stage}' stage; to start "
                           f"a new stage from it, pass it as the model (--init), not as --resume")
    return state


def named_optimizer_state(state: dict, names: list[str]) -> dict:
    """torch's optimizer state (parameters by index, in param_groups order) keyed by parameter name instead."""
    return {"state": {names[i]: v for i, v in state["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]}


def has_names(state: dict) -> bool:
    """Whether an optimizer state is keyed by parameter name (this version's checkpoints) or by index (torch's)."""
    return any(isinstance(p, str) for g in state["param_groups"] for p in g["params"])


def indexed_optimizer_state(state: dict, names: list[str]) -> dict:
    """The inverse of named_optimizer_state for an optimizer whose parameters, in param_groups order, are `names`;
    index-keyed states (checkpoints written before names were used) pass through."""
    if not has_names(state):
        return state
    index = {n: i for i, n in enumerate(names)}
    missing = [n for g in state["param_groups"] for n in g["params"] if n not in index]
    if missing:
        raise KeyError(f"the checkpoint's optimizer trains parameters this model does not train: {missing[:3]}")
    return {"state": {index[n]: v for n, v in state["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in state["param_groups"]]}
