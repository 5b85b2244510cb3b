"""Rotary embedding of q and k in one Triton pass, forward and backward.

The PyTorch form (palm_rlhf.palm.apply_rotary) makes several full-size fp32 temporaries per call (x * cos, the
rotate-half copy, x' * sin, the sum, the cast back) and as many again in the backward. Here each element of the
fused q/k projection is read once and written once, in fp32 registers, in both directions; cos/sin are loaded once
per (row, position) and broadcast over the heads of the tile. Measured effect on an H100: README, "Attention kernels".

Input: x (b, heads, n, d), any strides with a contiguous last axis (the view of the fused projection the model
makes, q and k heads together); cos and signed sin as palm_rlhf.palm.RotaryEmbedding returns them (b, 1, n, d),
fp32. Output: x's dtype, laid out (b, n, heads, d) in memory and returned as the (b, heads, n, d) view, as the
model's projection view is. Any head dim whose half is a power of two >= 4 (checked against PyTorch at 8, 16 and
64, fp32 and fp16, under the Triton interpreter and on an H100). No xPos scale (the model uses PyTorch for xPos).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .flash_attention import _last_contiguous

DTYPES = (torch.float32, torch.float16, torch.bfloat16)   # computed in fp32: fp64 would be rounded, so not taken


@triton.jit
def _rotary_kernel(X, COS, SIN, OUT, stride_xb, stride_xh, stride_xn, stride_cb, stride_cn,
                   stride_ob, stride_oh, stride_on, HEADS, N, SIGN: tl.constexpr, HALF: tl.constexpr,
                   HEADS_P2: tl.constexpr, BLOCK_N: tl.constexpr):
    """One (BLOCK_N positions) x (all heads) x (half the head dim) tile: both halves loaded, rotated, stored."""
    b = tl.program_id(1)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_h = tl.arange(0, HEADS_P2)
    offs_d = tl.arange(0, HALF)
    cs = b * stride_cb + offs_n[:, None] * stride_cn + offs_d[None, :]
    cos = tl.load(COS + cs, mask=offs_n[:, None] < N, other=0.0).to(tl.float32)[:, None, :]
    sin = (tl.load(SIN + cs + HALF, mask=offs_n[:, None] < N, other=0.0).to(tl.float32) * SIGN)[:, None, :]
    mask = (offs_n[:, None, None] < N) & (offs_h[None, :, None] < HEADS)
    x_ptr = X + b * stride_xb + offs_n[:, None, None] * stride_xn + offs_h[None, :, None] * stride_xh \
        + offs_d[None, None, :]
    o_ptr = OUT + b * stride_ob + offs_n[:, None, None] * stride_on + offs_h[None, :, None] * stride_oh \
        + offs_d[None, None, :]
    x1 = tl.load(x_ptr, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + HALF, mask=mask, other=0.0).to(tl.float32)   # second half holds +sin
    tl.store(o_ptr, (x1 * cos - x2 * sin).to(OUT.dtype.element_ty), mask=mask)
    tl.store(o_ptr + HALF, (x2 * cos + x1 * sin).to(OUT.dtype.element_ty), mask=mask)


def _rotate(x, cos, sin, sign: float):
    b, heads, n, d = x.shape
    x = _last_contiguous(x)
    out = torch.empty((b, n, heads, d), device=x.device, dtype=x.dtype).transpose(1, 2)
    heads_p2 = triton.next_power_of_2(heads)
    block_n = max(1, min(triton.next_power_of_2(n), 4096 // (heads_p2 * d // 2)))  # ~4k elements per half tile
    _rotary_kernel[(triton.cdiv(n, block_n), b)](
        x, cos, sin, out, x.stride(0), x.stride(1), x.stride(2), cos.stride(0), cos.stride(2),
        out.stride(0), out.stride(1), out.stride(2), heads, n, SIGN=sign, HALF=d // 2, HEADS_P2=heads_p2,
        BLOCK_N=block_n)
    return out


class RotaryFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin, 1.0)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return _rotate(grad, cos, sin, -1.0), None, None   # the transpose of a rotation is the opposite rotation


def supported(x) -> bool:
    """fp32 / fp16 / bf16 with an even head dim whose half is a power of two >= 4 (the tile's last axis)."""
    half = x.shape[-1] // 2
    return x.dtype in DTYPES and x.shape[-1] % 2 == 0 and half >= 4 and half & (half - 1) == 0


def fused_rotary(x, cos, sin):
    """x (b, heads, n, d) rotated by cos/sin (b, 1, n, d) as RotaryEmbedding returns them; differentiable in x."""
    if not supported(x):
        raise ValueError(f"fused rotary takes fp32, fp16 or bf16 (it computes in fp32) with an even head dim whose "
                         f"half is a power of two >= 4; got {x.dtype}, head dim {x.shape[-1]}: use "
                         f"palm_rlhf.palm.apply_rotary for others")
    if cos.shape != (x.shape[0], 1, x.shape[2], x.shape[3]) or sin.shape != cos.shape:
        raise ValueError(f"cos and sin must be (b, 1, n, d) = {(x.shape[0], 1, x.shape[2], x.shape[3])}, got "
                         f"{tuple(cos.shape)} and {tuple(sin.shape)}")
    cos, sin = _last_contiguous(cos), _last_contiguous(sin)
    return RotaryFunction.apply(x, cos, sin)
