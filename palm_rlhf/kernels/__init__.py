"""Triton kernels. Importing this package needs Triton; `palm_rlhf` itself does not import it until asked."""

from .decode import decode_attention
from .flash_attention import HEAD_DIMS, flash_attention, flash_attention_lse
from .rotary import fused_rotary

__all__ = ["flash_attention", "flash_attention_lse", "decode_attention", "fused_rotary", "HEAD_DIMS"]
