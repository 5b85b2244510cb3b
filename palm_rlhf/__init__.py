"""palm-rlhf: PaLM + RLHF (pretraining, SFT, reward model, PPO) in PyTorch, as a library of models and trainers.
Triton is optional (GPU kernels only)."""

from .attention import attend, set_backend
from .checkpoint import load
from .config import RunConfig, TrainConfig
from .data import load_corpus, prompt_sampler
from .lora import LoRAConfig, add_lora, merge_lora, set_lora, use_lora
from .palm import PRESETS, PaLM, PaLMConfig, next_token_loss
from .dpo import DPOConfig, DPOTrainer
from .grpo import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer
from .ilql import ILQLConfig, ILQLModel, ILQLSampler, ILQLTrainer
from .judges import JUDGES, load_judge
from .policy import ActorCritic, Policy
from .ppo import PPOConfig, PPOTrainer
from .pretrain import PretrainConfig, PretrainTrainer
from .reward import RewardConfig, RewardModel, RewardTrainer
from .sampling import Generation, KVCache, generate
from .sft import SFTConfig, SFTTrainer
from .training import NonFiniteError
from .utils import ConfigError

__all__ = ["PaLM", "PaLMConfig", "PRESETS", "next_token_loss", "attend", "set_backend", "KVCache", "Generation",
           "generate", "load", "LoRAConfig", "add_lora", "merge_lora", "set_lora", "use_lora", "RewardModel",
           "ActorCritic", "RunConfig", "TrainConfig", "PretrainConfig", "PretrainTrainer", "SFTConfig", "SFTTrainer",
           "RewardConfig", "RewardTrainer", "PPOConfig", "PPOTrainer", "NonFiniteError", "ConfigError", "load_corpus",
           "prompt_sampler", "Policy", "DPOConfig", "DPOTrainer", "JUDGES", "load_judge", "GRPOConfig",
           "GRPOTrainer", "RLOOConfig", "RLOOTrainer", "ILQLConfig", "ILQLModel", "ILQLSampler", "ILQLTrainer"]
