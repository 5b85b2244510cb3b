"""Flash-decoding in Triton: one new query token per row against a (multi-query) KV cache.

https://crfm.stanford.edu/2023/10/12/flashdecoding.html: the key axis is split across programs so that a decode
step with a small batch still fills the GPU; each split keeps an online softmax and a second pass merges the splits
by their log-sum-exp.

Supported: q (b, h, 1, d); k, v (b, g, j, d) with h % g == 0 (all h/g query heads of a k/v head are one tile, so
each cached key is read once per k/v head, not once per query head); optional key mask (b, j), True = real
(left padding, finished rows), or per-row valid lengths; fp32 / fp16 / bf16; head dims 16, 32, 64, 128. The query
is the last key column, so it always sees itself (the rule of palm_rlhf.attention). Forward only (sampling).
Measured on: an NVIDIA H100 80GB (see README) and Triton's CPU interpreter (correctness).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .flash_attention import HEAD_DIMS, INTERPRET, NEG, _check, _dot, _kvm_arg, _last_contiguous


@triton.jit
def _decode_kernel(Q, K, V, KVM, O, O_PART, LSE_PART, qk_scale,
                   stride_qb, stride_qh, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                   stride_ob, stride_oh, stride_kvmb, G, N, GROUP, SPLITS, keys_per_split,
                   HEAD_DIM: tl.constexpr, HAS_KVM: tl.constexpr, IEEE: tl.constexpr, DIRECT: tl.constexpr,
                   REP: tl.constexpr, BLOCK_N: tl.constexpr):
    bg = tl.program_id(0)
    split = tl.program_id(1)
    b, g = bg // G, bg % G
    offs_r = tl.arange(0, REP)                             # query heads of this k/v head (padded to REP)
    offs_d = tl.arange(0, HEAD_DIM)
    heads = g * GROUP + offs_r
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :], mask=offs_r[:, None] < GROUP,
                other=0.0)
    k_ptr = K + b * stride_kb + g * stride_kh
    v_ptr = V + b * stride_vb + g * stride_vh
    lo = split * keys_per_split
    hi = tl.minimum(lo + keys_per_split, N)
    m_i = tl.full([REP], NEG, dtype=tl.float32)
    l_i = tl.zeros([REP], dtype=tl.float32)
    acc = tl.zeros([REP, HEAD_DIM], dtype=tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        in_range = offs_n < hi
        kt = tl.load(k_ptr + offs_n[None, :] * stride_kn + offs_d[:, None], mask=in_range[None, :], other=0.0)
        s = _dot(q, kt, IEEE) * qk_scale                    # (REP, BLOCK_N)
        ok = in_range
        if HAS_KVM:
            kvm = tl.load(KVM + b * stride_kvmb + offs_n, mask=in_range, other=0)
            ok = ok & ((kvm != 0) | (offs_n == N - 1))
        s = tl.where(ok[None, :], s, NEG)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + offs_n[:, None] * stride_vn + offs_d[None, :], mask=in_range[:, None], other=0.0)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
        m_i = m_new
    if DIRECT:  # one split: normalise and write the output, no combine pass
        tl.store(O + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
                 (acc / l_i[:, None]).to(O.dtype.element_ty), mask=offs_r[:, None] < GROUP)
        return
    row = (b * G + g) * GROUP + offs_r                      # = b * H + head
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    tl.store(O_PART + (row[:, None] * SPLITS + split) * HEAD_DIM + offs_d[None, :], acc / l_safe[:, None],
             mask=offs_r[:, None] < GROUP)
    lse = tl.where(l_i > 0, m_i + tl.math.log2(l_safe), NEG)
    tl.store(LSE_PART + row * SPLITS + split, lse, mask=offs_r < GROUP)


@triton.jit
def _combine_kernel(O_PART, LSE_PART, O, stride_ob, stride_oh, H, SPLITS,
                    HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr):
    row = tl.program_id(0)                                  # b * H + h
    b, h = row // H, row % H
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, HEAD_DIM)
    lse = tl.load(LSE_PART + row * SPLITS + offs_s, mask=offs_s < SPLITS, other=NEG)
    w = tl.math.exp2(lse - tl.max(lse, 0))
    w = tl.where(offs_s < SPLITS, w, 0.0)
    o = tl.load(O_PART + (row * SPLITS + offs_s[:, None]) * HEAD_DIM + offs_d[None, :],
                mask=offs_s[:, None] < SPLITS, other=0.0)
    out = tl.sum(o * w[:, None], 0) / tl.sum(w, 0)
    tl.store(O + b * stride_ob + h * stride_oh + offs_d, out.to(O.dtype.element_ty))


def _num_splits(bg: int, n: int, block_n: int, device) -> int:
    """Split the keys only when a cache is long enough to be worth a second (combine) launch."""
    if INTERPRET or device.type != "cuda":
        return max(1, min(4, triton.cdiv(n, 4 * block_n)))
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(2 * sms, bg), triton.cdiv(n, 1024), 64))


def decode_attention(q, k, v, kv_mask=None, lengths=None):
    """Attention of one query token per row over cached keys: q (b, h, 1, d), k/v (b, g, j, d).

    kv_mask (b, j) bool (True = real key) or lengths (b,) valid keys per row counted from the *end*... see below.
    `lengths` is for right-aligned caches: row r's last `lengths[r]` keys are real (the query's own key included).
    """
    if q.ndim != 4 or q.shape[2] != 1:
        raise ValueError(f"decode_attention takes one query per row, q (b, h, 1, d); got {tuple(q.shape)}")
    b, h, _, d = q.shape
    g, n = k.shape[1], k.shape[2]
    if lengths is not None:
        if kv_mask is not None:
            raise ValueError("give kv_mask or lengths, not both")
        kv_mask = torch.arange(n, device=k.device)[None, :] >= (n - lengths.to(k.device)[:, None])
    _check(q, k, v, kv_mask)
    q, k, v = _last_contiguous(q), _last_contiguous(k), _last_contiguous(v)
    block_n = 16 if INTERPRET else 64
    splits = _num_splits(b * g, n, block_n, q.device)
    keys_per_split = triton.cdiv(triton.cdiv(n, splits), block_n) * block_n
    splits = triton.cdiv(n, keys_per_split)
    o = torch.empty_like(q)
    direct = splits == 1
    o_part = o if direct else torch.empty((b * h, splits, d), device=q.device, dtype=torch.float32)
    lse_part = o if direct else torch.empty((b * h, splits), device=q.device, dtype=torch.float32)
    kvm, stride_kvmb = _kvm_arg(kv_mask, q)
    rep = max(16, triton.next_power_of_2(h // g))
    _decode_kernel[(b * g, splits)](
        q, k, v, kvm, o, o_part, lse_part, d ** -0.5 * 1.4426950408889634,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        o.stride(0), o.stride(1), stride_kvmb, g, n, h // g, splits, keys_per_split,
        HEAD_DIM=d, HAS_KVM=kv_mask is not None, IEEE=q.dtype == torch.float32, DIRECT=direct, REP=rep,
        BLOCK_N=block_n, num_warps=4)
    if direct:
        return o
    _combine_kernel[(b * h,)](o_part, lse_part, o, o.stride(0), o.stride(1), h, splits, HEAD_DIM=d,
                              BLOCK_S=max(2, triton.next_power_of_2(splits)))
    return o


__all__ = ["decode_attention", "HEAD_DIMS"]
