"""palm-rlhf: PaLM + RLHF (SFT, reward model, PPO) in PyTorch. Triton is optional (GPU kernels only)."""

from .attention import attend, set_backend
from .palm import PRESETS, PaLM, PaLMConfig, next_token_loss
from .sampling import Generation, KVCache, generate

__all__ = ["PaLM", "PaLMConfig", "PRESETS", "next_token_loss", "attend", "set_backend", "KVCache", "Generation",
           "generate"]
