"""FlashAttention-2 style fused attention in Triton, forward and backward, multi-query native.

Algorithm: https://arxiv.org/abs/2307.08691 (online softmax over key tiles, the log-sum-exp saved for the backward,
which recomputes the probabilities tile by tile; dK/dV and dQ in separate kernels, no atomics, deterministic: on an
H100 a variant adding dQ from the dK/dV kernel with atomics, as FlashAttention-2 does, ran 2-3x slower).

Supported
- q (b, h, i, d); k, v (b, g, j, d) with h % g == 0: g = 1 is multi-query, 1 < g < h grouped-query. k/v are read
  through their strides and never expanded; the dK/dV kernel owns one k/v tile and loops over the h/g query heads
  that share it, so the reduction over query heads happens in registers.
- causal (queries aligned to the end of the keys, see palm_rlhf.attention) or not; optional key-padding mask
  (b, j) with the "padding queries see only themselves" rule of palm_rlhf.attention.
- fp32, fp16, bf16 inputs (all three the same dtype), fp32 accumulation; fp32 dots run in IEEE precision (no TF32),
  so fp32 results match the reference to float rounding.
- head dims 16, 32, 64, 128 (other sizes raise ValueError); any sequence lengths; any strides on batch, head and
  sequence axes (the head axis must be contiguous, else that tensor is copied once).

Measured on: an NVIDIA H100 80GB (README has the table: forward+backward 0.70-0.76x SDPA at seq 4096, so SDPA stays
the default) and, for correctness only, Triton's CPU interpreter. GPU tiles are autotuned per power-of-two
sequence bucket. Known gaps: slower than SDPA (no TMA / warp specialisation, QK^T recomputed by the dQ kernel), no
dropout, no attention bias / ALiBi, no sliding window, head dims above 128, no fp8.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
HEAD_DIMS = (16, 32, 64, 128)
NEG = tl.constexpr(-1.0e38)  # finite "minus infinity": a fully masked tile can never produce NaN
# block sizes under the interpreter (unequal on purpose, so tile boundaries are exercised by the tests)
INTERPRET_BLOCKS = {"fwd": (32, 16), "dkdv": (16, 32), "dq": (32, 16)}


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _allowed(offs_q_col, offs_n, N, kvm_row, CAUSAL: tl.constexpr, HAS_KVM: tl.constexpr, BOUNDS: tl.constexpr):
    """(rows, cols) mask of visible keys: in range, causal, and not padding (a query always sees itself)."""
    ok = offs_n[None, :] >= 0
    if BOUNDS:
        ok = ok & (offs_n[None, :] < N)
    if CAUSAL:
        ok = ok & (offs_n[None, :] <= offs_q_col[:, None])
    if HAS_KVM:
        kvm = tl.load(kvm_row + offs_n, mask=offs_n < N, other=0)
        ok = ok & ((kvm[None, :] != 0) | (offs_n[None, :] == offs_q_col[:, None]))
    return ok


@triton.jit
def _key_range(start_m, offset, N, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keys a query tile needs: [0, full_hi) visible to every row (no causal or bounds mask), then [full_hi, hi)."""
    if CAUSAL:
        # keys <= the tile's first query column are visible to every row
        full_hi = ((offset + start_m + 1) // BLOCK_N) * BLOCK_N
        hi = tl.minimum(offset + start_m + BLOCK_M, N)
    else:
        full_hi = (N // BLOCK_N) * BLOCK_N
        hi = N
    return full_hi, hi


@triton.jit
def _fwd_tiles(acc, l_i, m_i, q, k_ptr, v_ptr, kvm_row, stride_kn, stride_vn, offs_q_col, offs_d, lo, hi, N,
               qk_scale, CAUSAL: tl.constexpr, HAS_KVM: tl.constexpr, BOUNDS: tl.constexpr,
               BLOCK_N: tl.constexpr, IEEE: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kt = tl.load(k_ptr + offs_n[None, :] * stride_kn + offs_d[:, None], mask=offs_n[None, :] < N, other=0.0)
        s = _dot(q, kt, IEEE) * qk_scale
        if CAUSAL or HAS_KVM or BOUNDS:
            s = tl.where(_allowed(offs_q_col, offs_n, N, kvm_row, CAUSAL, HAS_KVM, BOUNDS), s, NEG)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + offs_n[:, None] * stride_vn + offs_d[None, :], mask=offs_n[:, None] < N, other=0.0)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, KVM, qk_scale,
                stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_om, stride_kvmb,
                H, M, N, GROUP, SEQ_BUCKET,
                HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_KVM: tl.constexpr, IEEE: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M   # longest (last) query tiles first
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    g = h // GROUP
    offset = N - M                                         # queries sit at the last M key columns
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_q_col = offset + offs_m
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                mask=offs_m[:, None] < M, other=0.0)
    k_ptr = K + b * stride_kb + g * stride_kh
    v_ptr = V + b * stride_vb + g * stride_vh
    kvm_row = KVM + b * stride_kvmb

    m_i = tl.full([BLOCK_M], NEG, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    full_hi, hi = _key_range(start_m, offset, N, CAUSAL, BLOCK_M, BLOCK_N)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_ptr, v_ptr, kvm_row, stride_kn, stride_vn, offs_q_col, offs_d,
                               0, full_hi, N, qk_scale, False, HAS_KVM, False, BLOCK_N, IEEE)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_ptr, v_ptr, kvm_row, stride_kn, stride_vn, offs_q_col, offs_d,
                               full_hi, hi, N, qk_scale, CAUSAL, HAS_KVM, True, BLOCK_N, IEEE)
    acc = acc / l_i[:, None]
    tl.store(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :],
             acc.to(O.dtype.element_ty), mask=offs_m[:, None] < M)
    tl.store(LSE + bh * M + offs_m, m_i + tl.math.log2(l_i), mask=offs_m < M)   # log2-sum-exp2


@triton.jit
def _bwd_preprocess(O, DO, DELTA, stride_ob, stride_oh, stride_om, stride_dob, stride_doh, stride_dom, H, M,
                    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    mask = offs_m[:, None] < M
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :],
                 mask=mask, other=0.0)
    tl.store(DELTA + bh * M + offs_m, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=offs_m < M)


@triton.jit
def _dkdv_tiles(dk, dv, k, v, q_ptr, do_ptr, lse_ptr, delta_ptr, kvm_row, stride_qm, stride_dom, offs_n, offs_d,
                lo, hi, M, N, offset, qk_scale, CAUSAL: tl.constexpr, HAS_KVM: tl.constexpr, BOUNDS: tl.constexpr,
                BLOCK_M: tl.constexpr, IEEE: tl.constexpr):
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = tl.load(q_ptr + offs_m[:, None] * stride_qm + offs_d[None, :], mask=offs_m[:, None] < M, other=0.0)
        do = tl.load(do_ptr + offs_m[:, None] * stride_dom + offs_d[None, :], mask=offs_m[:, None] < M, other=0.0)
        lse = tl.load(lse_ptr + offs_m, mask=offs_m < M, other=0.0)
        delta = tl.load(delta_ptr + offs_m, mask=offs_m < M, other=0.0)
        st = _dot(k, tl.trans(q), IEEE) * qk_scale                       # (BLOCK_N, BLOCK_M)
        pt = tl.math.exp2(st - lse[None, :])
        if CAUSAL or HAS_KVM or BOUNDS:
            ok = tl.trans(_allowed(offset + offs_m, offs_n, N, kvm_row, CAUSAL, HAS_KVM, BOUNDS))
            if BOUNDS:
                ok = ok & (offs_m[None, :] < M)
            pt = tl.where(ok, pt, 0.0)
        dv += _dot(pt.to(do.dtype), do, IEEE)
        dpt = _dot(v, tl.trans(do), IEEE)
        dst = pt * (dpt - delta[None, :])
        dk += _dot(dst.to(q.dtype), q, IEEE)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, DK, DV, LSE, DELTA, KVM, qk_scale, sm_scale,
                     stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                     stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_dom,
                     stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn, stride_kvmb,
                     stride_split, H, G, M, N, GROUP, SPLITS, SEQ_BUCKET,
                     HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_KVM: tl.constexpr, IEEE: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_n = tl.program_id(0) * BLOCK_N
    bg = tl.program_id(1)
    split = tl.program_id(2)                               # which share of the query heads (partial sums)
    b, g = bg // G, bg % G
    offset = N - M
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    k = tl.load(K + b * stride_kb + g * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :],
                mask=offs_n[:, None] < N, other=0.0)
    v = tl.load(V + b * stride_vb + g * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :],
                mask=offs_n[:, None] < N, other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    kvm_row = KVM + b * stride_kvmb
    if CAUSAL:
        # first query tile that sees any key of this tile, and first one that sees all of them
        lo = (tl.maximum(start_n - offset, 0) // BLOCK_M) * BLOCK_M
        mid = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - offset, 0), BLOCK_M) * BLOCK_M
        mid = tl.minimum(tl.maximum(mid, lo), M)
    else:
        lo = 0
        mid = 0
    full_hi = tl.maximum((M // BLOCK_M) * BLOCK_M, mid)
    for r in range(split, GROUP, SPLITS):                  # the query heads that share this k/v head
        h = g * GROUP + r
        q_ptr = Q + b * stride_qb + h * stride_qh
        do_ptr = DO + b * stride_dob + h * stride_doh
        lse_ptr = LSE + (b * H + h) * M
        delta_ptr = DELTA + (b * H + h) * M
        # tiles on the causal diagonal, then fully visible tiles, then the ragged last tile
        dk, dv = _dkdv_tiles(dk, dv, k, v, q_ptr, do_ptr, lse_ptr, delta_ptr, kvm_row, stride_qm, stride_dom,
                             offs_n, offs_d, lo, mid, M, N, offset, qk_scale, CAUSAL, HAS_KVM, True, BLOCK_M, IEEE)
        dk, dv = _dkdv_tiles(dk, dv, k, v, q_ptr, do_ptr, lse_ptr, delta_ptr, kvm_row, stride_qm, stride_dom,
                             offs_n, offs_d, mid, full_hi, M, N, offset, qk_scale, False, HAS_KVM, False,
                             BLOCK_M, IEEE)
        dk, dv = _dkdv_tiles(dk, dv, k, v, q_ptr, do_ptr, lse_ptr, delta_ptr, kvm_row, stride_qm, stride_dom,
                             offs_n, offs_d, full_hi, M, M, N, offset, qk_scale, False, HAS_KVM, True, BLOCK_M, IEEE)
    DK += split * stride_split
    DV += split * stride_split
    tl.store(DK + b * stride_dkb + g * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :],
             (dk * sm_scale).to(DK.dtype.element_ty), mask=offs_n[:, None] < N)
    tl.store(DV + b * stride_dvb + g * stride_dvh + offs_n[:, None] * stride_dvn + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=offs_n[:, None] < N)


@triton.jit
def _dq_tiles(dq, q, do, lse, delta, k_ptr, v_ptr, kvm_row, stride_kn, stride_vn, offs_q_col, offs_d, lo, hi, N,
              qk_scale, CAUSAL: tl.constexpr, HAS_KVM: tl.constexpr, BOUNDS: tl.constexpr,
              BLOCK_N: tl.constexpr, IEEE: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kt = tl.load(k_ptr + offs_n[None, :] * stride_kn + offs_d[:, None], mask=offs_n[None, :] < N, other=0.0)
        vt = tl.load(v_ptr + offs_n[None, :] * stride_vn + offs_d[:, None], mask=offs_n[None, :] < N, other=0.0)
        p = tl.math.exp2(_dot(q, kt, IEEE) * qk_scale - lse[:, None])
        if CAUSAL or HAS_KVM or BOUNDS:
            p = tl.where(_allowed(offs_q_col, offs_n, N, kvm_row, CAUSAL, HAS_KVM, BOUNDS), p, 0.0)
        dp = _dot(do, vt, IEEE)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(kt.dtype), tl.trans(kt), IEEE)
    return dq


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, DQ, LSE, DELTA, KVM, qk_scale, sm_scale,
                   stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                   stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_dom,
                   stride_dqb, stride_dqh, stride_dqm, stride_kvmb,
                   H, M, N, GROUP, SEQ_BUCKET,
                   HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_KVM: tl.constexpr, IEEE: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M   # longest (last) query tiles first
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    g = h // GROUP
    offset = N - M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_q_col = offset + offs_m
    offs_d = tl.arange(0, HEAD_DIM)
    row_mask = offs_m[:, None] < M
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :], mask=row_mask,
                other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :],
                 mask=row_mask, other=0.0)
    lse = tl.load(LSE + bh * M + offs_m, mask=offs_m < M, other=0.0)
    delta = tl.load(DELTA + bh * M + offs_m, mask=offs_m < M, other=0.0)
    k_ptr = K + b * stride_kb + g * stride_kh
    v_ptr = V + b * stride_vb + g * stride_vh
    kvm_row = KVM + b * stride_kvmb
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    full_hi, hi = _key_range(start_m, offset, N, CAUSAL, BLOCK_M, BLOCK_N)
    dq = _dq_tiles(dq, q, do, lse, delta, k_ptr, v_ptr, kvm_row, stride_kn, stride_vn, offs_q_col, offs_d,
                   0, full_hi, N, qk_scale, False, HAS_KVM, False, BLOCK_N, IEEE)
    dq = _dq_tiles(dq, q, do, lse, delta, k_ptr, v_ptr, kvm_row, stride_kn, stride_vn, offs_q_col, offs_d,
                   full_hi, hi, N, qk_scale, CAUSAL, HAS_KVM, True, BLOCK_N, IEEE)
    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :],
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=row_mask)


# ------------------------------------------------------------------------------------------------ GPU autotuning

def _configs(pairs):
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in pairs]


# tuned per power-of-two sequence bucket: the best tiles at 512 and at 8192 rows differ
_KEY = ["SEQ_BUCKET", "HEAD_DIM", "CAUSAL", "HAS_KVM", "IEEE"]
AUTOTUNE = not INTERPRET and os.environ.get("PALM_TRITON_AUTOTUNE", "1") != "0"
_PLAIN = {"fwd": _fwd_kernel, "dkdv": _bwd_dkdv_kernel, "dq": _bwd_dq_kernel}
_TUNED = {} if INTERPRET else {
    "fwd": triton.autotune(_configs([(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 128, 4, 3),
                                     (128, 64, 4, 4), (128, 128, 8, 4), (64, 64, 4, 3), (128, 32, 4, 4)]),
                           key=_KEY)(_fwd_kernel),
    "dkdv": triton.autotune(_configs([(32, 128, 4, 3), (32, 128, 4, 5), (64, 128, 8, 3), (64, 128, 4, 3),
                                      (32, 64, 4, 3), (64, 64, 4, 2)]), key=_KEY)(_bwd_dkdv_kernel),
    "dq": triton.autotune(_configs([(128, 32, 4, 3), (128, 32, 4, 5), (128, 64, 8, 3), (128, 64, 4, 3),
                                    (64, 64, 4, 3), (64, 32, 4, 2)]), key=_KEY)(_bwd_dq_kernel),
}
# untuned GPU tiles (fp32 needs twice the shared memory per tile, so smaller ones)
_FIXED = {"fwd": (64, 64), "dkdv": (32, 64), "dq": (64, 32)}
_FIXED_FP32 = {"fwd": (32, 32), "dkdv": (32, 32), "dq": (32, 32)}


def _launch(kind, grid, args, dtype, **flags):
    """Run kernel `kind`: autotuned on GPUs for fp16/bf16, fixed tiles otherwise (interpreter, fp32, tuning off)."""
    if INTERPRET:
        blocks = INTERPRET_BLOCKS[kind]
        return _PLAIN[kind][grid](*args, **flags, BLOCK_M=blocks[0], BLOCK_N=blocks[1])
    if AUTOTUNE and dtype != torch.float32:
        return _TUNED[kind][grid](*args, **flags)
    blocks = (_FIXED_FP32 if dtype == torch.float32 else _FIXED)[kind]
    return _PLAIN[kind][grid](*args, **flags, BLOCK_M=blocks[0], BLOCK_N=blocks[1], num_warps=4, num_stages=2)

# ------------------------------------------------------------------------------------------------ launchers


def _check(q, k, v, kv_mask):
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"flash_attention expects q (b, h, i, d) and k, v (b, g, j, d); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    b, h, m, d = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"k and v must both be (b={b}, g, j, d={d}); got {tuple(k.shape)} and {tuple(v.shape)}")
    if h % k.shape[1] != 0:
        raise ValueError(f"query heads ({h}) must be a multiple of key/value heads ({k.shape[1]})")
    if m > k.shape[2]:
        raise ValueError(f"more queries ({m}) than keys ({k.shape[2]})")
    if d not in HEAD_DIMS:
        raise ValueError(f"head dim {d} is not supported by the Triton kernels (supported: {HEAD_DIMS}); "
                         f"use the 'sdpa' backend for it")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"q, k, v must share one dtype among fp16, bf16, fp32; got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError("q, k, v must be on the same device")
    if kv_mask is not None and tuple(kv_mask.shape) != (b, k.shape[2]):
        raise ValueError(f"kv_mask must be (b, j) = ({b}, {k.shape[2]}); got {tuple(kv_mask.shape)}")


def _last_contiguous(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _kvm_arg(kv_mask, q):
    if kv_mask is None:
        return q.new_empty((1,), dtype=torch.int8), 0
    kvm = kv_mask.contiguous()
    kvm = kvm.view(torch.int8) if kvm.dtype == torch.bool else kvm.to(torch.int8)  # bool -> int8 is a free view
    return kvm, kvm.stride(0)


def _seq_bucket(m: int, n: int) -> int:
    return triton.next_power_of_2(max(m, n, 128))


def _forward(q, k, v, causal, kv_mask):
    b, h, m, d = q.shape
    g, n = k.shape[1], k.shape[2]
    o = torch.empty_like(q)
    lse = torch.empty((b, h, m), device=q.device, dtype=torch.float32)
    kvm, stride_kvmb = _kvm_arg(kv_mask, q)
    sm_scale = d ** -0.5
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), b * h)  # noqa: E731
    _launch("fwd", grid, (q, k, v, o, lse, kvm, sm_scale * 1.4426950408889634,
                          q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                          v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2), stride_kvmb,
                          h, m, n, h // g, _seq_bucket(m, n)), q.dtype,
            HEAD_DIM=d, CAUSAL=causal, HAS_KVM=kv_mask is not None, IEEE=q.dtype == torch.float32)
    return o, lse


def _dkdv_splits(programs: int, group: int, device) -> int:
    if INTERPRET or device.type != "cuda":
        return min(group, 2)  # exercise the split path in CPU tests
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(group, triton.cdiv(4 * sms, programs)))


def _backward(do, q, k, v, o, lse, causal, kv_mask):
    b, h, m, d = q.shape
    g, n = k.shape[1], k.shape[2]
    do = _last_contiguous(do)
    delta = torch.empty_like(lse)
    _bwd_preprocess[(triton.cdiv(m, 64), b * h)](o, do, delta, o.stride(0), o.stride(1), o.stride(2),
                                                  do.stride(0), do.stride(1), do.stride(2), h, m,
                                                  HEAD_DIM=d, BLOCK_M=64)
    # With few k/v heads the dK/dV grid is small (multi-query: b * j / BLOCK_N programs); split the query heads
    # over more programs and sum their fp32 partial results.
    splits = _dkdv_splits(b * g * triton.cdiv(n, 64), h // g, q.device)
    if splits == 1:
        dk, dv = torch.empty_like(k), torch.empty_like(v)
    else:
        dk = torch.empty((splits, b, g, n, d), device=q.device, dtype=torch.float32)
        dv = torch.empty_like(dk)
    dk_, dv_ = dk if splits == 1 else dk[0], dv if splits == 1 else dv[0]
    kvm, stride_kvmb = _kvm_arg(kv_mask, q)
    sm_scale = d ** -0.5
    qk_scale = sm_scale * 1.4426950408889634
    flags = dict(HEAD_DIM=d, CAUSAL=causal, HAS_KVM=kv_mask is not None, IEEE=q.dtype == torch.float32)
    bucket = _seq_bucket(m, n)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), b * g, splits)  # noqa: E731
    _launch("dkdv", grid, (q, k, v, do, dk, dv, lse, delta, kvm, qk_scale, sm_scale,
                           q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                           v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
                           dk_.stride(0), dk_.stride(1), dk_.stride(2), dv_.stride(0), dv_.stride(1), dv_.stride(2),
                           stride_kvmb, dk.stride(0) if splits > 1 else 0, h, g, m, n, h // g, splits, bucket),
            q.dtype, **flags)
    if splits > 1:
        dk, dv = dk.sum(0).to(k.dtype), dv.sum(0).to(v.dtype)
    dq = torch.empty_like(q)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), b * h)  # noqa: E731
    _launch("dq", grid, (q, k, v, do, dq, lse, delta, kvm, qk_scale, sm_scale,
                         q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                         v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
                         dq.stride(0), dq.stride(1), dq.stride(2), stride_kvmb, h, m, n, h // g, bucket), q.dtype,
            **flags)
    return dq, dk, dv


class FlashAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, kv_mask):
        q, k, v = _last_contiguous(q), _last_contiguous(k), _last_contiguous(v)
        o, lse = _forward(q, k, v, causal, kv_mask)
        ctx.save_for_backward(q, k, v, o, lse, kv_mask)
        ctx.causal = causal
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, kv_mask = ctx.saved_tensors
        dq, dk, dv = _backward(do, q, k, v, o, lse, ctx.causal, kv_mask)
        return dq, dk, dv, None, None


def flash_attention(q, k, v, causal: bool = True, kv_mask=None):
    """Fused attention; q (b, h, i, d), k and v (b, g, j, d); kv_mask (b, j) bool, True = real key."""
    _check(q, k, v, kv_mask)
    return FlashAttentionFunction.apply(q, k, v, causal, kv_mask)


def flash_attention_lse(q, k, v, causal: bool = True, kv_mask=None):
    """Forward only, also returning the natural-log log-sum-exp of each query row (b, h, i) (for tests/tools)."""
    _check(q, k, v, kv_mask)
    q, k, v = _last_contiguous(q), _last_contiguous(k), _last_contiguous(v)
    o, lse = _forward(q, k, v, causal, kv_mask)
    return o, lse * math.log(2)
