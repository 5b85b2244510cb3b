"""Attention dispatch: one seam, several backends.

    attend(q, k, v, causal=..., kv_mask=..., backend=...)

q: (b, h, i, d) query heads; k, v: (b, g, j, d) key/value heads with h % g == 0 (g = 1 is multi-query attention,
https://arxiv.org/abs/1911.02150). k and v are never expanded to h heads by the reference or the Triton kernels.

Masking rules, shared by every backend (the tests hold them to it):
- queries are aligned to the *end* of the keys: query i sits at key column `j - i_len + i` (so a prefill with an
  empty cache and a one-token decode against a full cache use the same rule);
- `causal`: query at column c sees keys 0..c;
- `kv_mask` (b, j), True = real key: real queries never see padding keys. A padding query (its own column is
  masked out) sees only itself, so no row is ever fully masked and no NaN can appear; its output is meaningless and
  callers ignore it.

Backends: "reference" (plain PyTorch, the specification), "sdpa" (torch.nn.functional.scaled_dot_product_attention),
"triton" (our fused kernels in palm_rlhf.kernels, CUDA or the Triton interpreter), "auto" (SDPA: on an H100 our
kernels measured 0.70-0.76x SDPA's speed for forward+backward at seq 4096, see README, so they are opt-in until they
win). Independently of the backend, q/k rotary runs as one fused Triton kernel on CUDA (use_fused_rotary).
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from .utils import exists

BACKENDS = ("auto", "reference", "sdpa", "triton")
_default_backend = os.environ.get("PALM_ATTN_BACKEND", "auto")
FUSED_ROTARY = os.environ.get("PALM_FUSED_ROTARY", "1") != "0"


def set_backend(name: str) -> None:
    """Set the process-wide default backend (a model config's `attn_backend` other than "auto" wins over it)."""
    global _default_backend
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {BACKENDS}")
    _default_backend = name


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def requested(backend: str | None) -> str:
    """The backend asked for: this call's, else the process default (either may still be "auto")."""
    return backend if backend not in (None, "auto") else _default_backend


def use_fused_rotary(x: Tensor, backend: str | None) -> bool:
    """Rotate q/k with the Triton kernel: on CUDA with any backend but 'reference' (set PALM_FUSED_ROTARY=0 to turn it
    off), and on CPU only under the Triton interpreter with the 'triton' backend (tests); only for inputs the kernel
    takes (palm_rlhf.kernels.rotary.supported: fp64 stays in PyTorch, the kernel computes in fp32)."""
    if not FUSED_ROTARY or not triton_available():
        return False
    backend = requested(backend)
    wanted = backend != "reference" if x.is_cuda else backend == "triton" and _triton_interpreting()
    if not wanted:
        return False
    from .kernels.rotary import supported
    return supported(x)


def visible_mask(i: int, j: int, causal: bool, kv_mask: Tensor | None, device) -> Tensor | None:
    """Boolean (b or 1, i, j) mask of which keys each query sees, by the rules in the module docstring."""
    if not causal and not exists(kv_mask):
        return None
    if i == 1 and exists(kv_mask):  # a decode step: the last key column, which sees every real key and itself
        allowed = kv_mask.clone()
        allowed[:, -1] = True
        return allowed[:, None, :]
    cols = torch.arange(j, device=device)
    q_cols = torch.arange(j - i, j, device=device)
    allowed = torch.ones(1, i, j, dtype=torch.bool, device=device)
    if causal:
        allowed = allowed & (cols[None, :] <= q_cols[:, None])[None]
    if exists(kv_mask):
        diagonal = (cols[None, :] == q_cols[:, None])[None]
        allowed = allowed & (kv_mask[:, None, :] | diagonal)
    return allowed


def reference_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = True, kv_mask: Tensor | None = None,
                        scale: float | None = None) -> Tensor:
    """Plain PyTorch attention, grouped over the shared k/v heads (no expansion). Softmax in fp32."""
    b, h, i, d = q.shape
    g, j = k.shape[1], k.shape[2]
    scale = scale if exists(scale) else d ** -0.5
    q = rearrange(q, "b (g r) i d -> b g r i d", g=g)
    sim = torch.einsum("b g r i d, b g j d -> b g r i j", q, k).float() * scale
    allowed = visible_mask(i, j, causal, kv_mask, q.device)
    if exists(allowed):
        sim = sim.masked_fill(~allowed[:, None, None], torch.finfo(sim.dtype).min)
    attn = sim.softmax(dim=-1).to(v.dtype)
    out = torch.einsum("b g r i j, b g j d -> b g r i d", attn, v)
    return rearrange(out, "b g r i d -> b (g r) i d")


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = True, kv_mask: Tensor | None = None) -> Tensor:
    i, j = q.shape[-2], k.shape[-2]
    gqa = k.shape[1] != q.shape[1]
    if not exists(kv_mask) and (not causal or i == 1):
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    if not exists(kv_mask) and i == j:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    allowed = visible_mask(i, j, causal, kv_mask, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None], enable_gqa=gqa)


def _resolve(backend: str | None, q: Tensor) -> str:
    backend = requested(backend)
    if backend == "auto":
        return "sdpa"
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("attention backend 'triton' needs Triton: `pip install triton` (or use 'sdpa')")
        if not q.is_cuda and not _triton_interpreting():
            raise RuntimeError("attention backend 'triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before "
                               "palm_rlhf is imported to run the kernels on CPU (slow; for tests)")
    return backend


def attend(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = True, kv_mask: Tensor | None = None,
           backend: str | None = None) -> Tensor:
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})")
    if q.shape[-2] > k.shape[-2]:
        raise ValueError(f"more queries ({q.shape[-2]}) than keys ({k.shape[-2]}): queries align to the last keys")
    backend = _resolve(backend, q)
    if backend == "reference":
        return reference_attention(q, k, v, causal, kv_mask)
    if backend == "sdpa":
        return sdpa_attention(q, k, v, causal, kv_mask)
    from .kernels import decode_attention, flash_attention
    if q.shape[-2] == 1 and not torch.is_grad_enabled():
        return decode_attention(q, k, v, kv_mask=kv_mask)
    return flash_attention(q, k, v, causal=causal, kv_mask=kv_mask)
