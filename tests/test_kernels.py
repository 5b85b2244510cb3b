"""Triton kernels == the plain PyTorch reference (kept here), forward and all three gradients.

CPU: Triton's interpreter (conftest). GPU: PALM_TEST_DEVICE=cuda pytest tests/test_kernels.py.
Reference maths run in float64 on the same (rounded) inputs. Tolerances:
- fp32: kernels use IEEE fp32 dots; differences are accumulation order only (~1e-6 seen): atol 1e-4.
- fp16 (eps 9.8e-4): probabilities are rounded to fp16 before the P@V and dS@K dots, so outputs/grads of O(1)
  carry ~1e-3 absolute error (seen up to 2.2e-3): atol = rtol = 1e-2.
- bf16 (eps 7.8e-3, GPU only; the interpreter's bf16 dot is broken): atol = rtol = 6e-2.
"""

import math

import pytest
import torch

from conftest import DEVICE

triton = pytest.importorskip("triton")

from palm_rlhf.kernels import decode_attention, flash_attention, flash_attention_lse  # noqa: E402

TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 6e-2}
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def reference(q, k, v, causal, kv_mask):
    """Attention by the rules of palm_rlhf.attention, written out independently with expanded k/v."""
    h, g = q.shape[1], k.shape[1]
    k = k.repeat_interleave(h // g, dim=1)
    v = v.repeat_interleave(h // g, dim=1)
    i, j = q.shape[2], k.shape[2]
    sim = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    q_col = torch.arange(j - i, j, device=q.device)[:, None]
    k_col = torch.arange(j, device=q.device)[None, :]
    allowed = torch.ones(i, j, dtype=torch.bool, device=q.device)[None]
    if causal:
        allowed = allowed & (k_col <= q_col)
    if kv_mask is not None:
        allowed = allowed & (kv_mask[:, None, :] | (k_col == q_col))
    sim = sim.masked_fill(~allowed[:, None], float("-inf"))
    return sim.softmax(-1) @ v


def make_inputs(b, h, g, i, j, d, dtype, padded, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, hh, n, d, generator=gen).to(DEVICE, dtype) for hh, n in ((h, i), (g, j), (g, j)))
    kv_mask = None
    if padded:  # left padding on row 0, a hole in the middle of row 1, nothing on the rest
        kv_mask = torch.ones(b, j, dtype=torch.bool)
        kv_mask[0, : j // 3] = False
        if b > 1:
            kv_mask[1, j // 2: j // 2 + 3] = False
        kv_mask = kv_mask.to(DEVICE)
    return q, k, v, kv_mask


def check(b, h, g, i, j, d, dtype, causal, padded):
    q, k, v, kv_mask = make_inputs(b, h, g, i, j, d, dtype, padded)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = flash_attention(q, k, v, causal=causal, kv_mask=kv_mask)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    out.backward(grad_out)
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = reference(*ref_in, causal, kv_mask)
    ref.backward(grad_out.double())
    tol = TOL[dtype]
    for name, got, want in [("out", out, ref)] + [(f"d{n}", t.grad, r.grad) for n, t, r in zip("qkv", (q, k, v), ref_in)]:
        got = got.double()
        bad = ~torch.isclose(got, want, atol=tol, rtol=tol)
        assert not bad.any(), (f"{name} mismatch at {bad.nonzero()[:5].tolist()}: got {got[bad][:5].tolist()}, "
                               f"want {want[bad][:5].tolist()}; max abs err {(got - want).abs().max():.3e}")


@pytest.mark.parametrize("seq", [1, 17, 127])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("kv_heads", [1, 2])
def test_fp32_matches_reference(seq, causal, padded, kv_heads):
    check(2, 4, kv_heads, seq, seq, 16, torch.float32, causal, padded)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal,padded,kv_heads", [(True, True, 1), (False, False, 2), (True, False, 1)])
def test_seq_257(dtype, causal, padded, kv_heads):
    check(1, 4, kv_heads, 257, 257, 32, dtype, causal, padded)


@pytest.mark.parametrize("dtype", DTYPES)
def test_half_precisions_ragged(dtype):
    check(2, 4, 1, 45, 45, 32, dtype, True, True)


@pytest.mark.parametrize("d", [32, 64, 128])
def test_head_dims(d):
    check(1, 2, 1, 19, 19, d, torch.float32, True, True)


@pytest.mark.parametrize("causal", [True, False])
def test_fewer_queries_than_keys(causal):
    """Queries aligned to the last keys (a chunked prefill against a cache)."""
    check(2, 4, 1, 21, 50, 16, torch.float32, causal, True)


def test_non_contiguous_inputs():
    """q, k, v sliced out of one fused projection, as the model does: strided, never copied by the caller."""
    b, n, h, d = 2, 33, 4, 16
    gen = torch.Generator().manual_seed(3)
    fused = torch.randn(b, n, (h + 2) * d, generator=gen).to(DEVICE).requires_grad_()
    q = fused[..., : h * d].unflatten(-1, (h, d)).transpose(1, 2)
    k = fused[..., h * d: (h + 1) * d].unflatten(-1, (1, d)).transpose(1, 2)
    v = fused[..., (h + 1) * d:].unflatten(-1, (1, d)).transpose(1, 2)
    assert not q.is_contiguous() and not k.is_contiguous()
    out = flash_attention(q, k, v, causal=True)
    out.sum().backward()
    grad = fused.grad.clone()
    fused.grad = None
    ref = reference(q.double(), k.double(), v.double(), True, None)
    torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-4)
    ref.sum().backward()
    torch.testing.assert_close(grad, fused.grad, atol=1e-4, rtol=1e-4)


def test_log_sum_exp():
    q, k, v, _ = make_inputs(1, 2, 1, 20, 20, 16, torch.float32, False)
    _, lse = flash_attention_lse(q, k, v, causal=True)
    sim = (q @ k.transpose(-1, -2)).double() / 4.0
    sim = sim.masked_fill(torch.ones(20, 20, dtype=torch.bool, device=DEVICE).triu(1), float("-inf"))
    torch.testing.assert_close(lse.double(), sim.logsumexp(-1), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("n", [1, 17, 100, 257])
@pytest.mark.parametrize("kv_heads", [1, 2])
def test_decode_matches_reference(n, kv_heads):
    gen = torch.Generator().manual_seed(n)
    q = torch.randn(3, 4, 1, 32, generator=gen).to(DEVICE)
    k, v = (torch.randn(3, kv_heads, n, 32, generator=gen).to(DEVICE) for _ in range(2))
    kv_mask = (torch.rand(3, n, generator=gen) > 0.3).to(DEVICE)
    kv_mask[2] = False  # a row whose only visible key is the query's own
    got = decode_attention(q, k, v, kv_mask=kv_mask)
    torch.testing.assert_close(got.double(), reference(q.double(), k.double(), v.double(), True, kv_mask),
                               atol=1e-4, rtol=1e-4)


def test_decode_lengths_equal_mask():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 1, 16, generator=gen).to(DEVICE)
    k, v = (torch.randn(2, 1, 40, 16, generator=gen).to(DEVICE) for _ in range(2))
    lengths = torch.tensor([40, 7], device=DEVICE)
    mask = torch.arange(40, device=DEVICE)[None] >= 40 - lengths[:, None]
    torch.testing.assert_close(decode_attention(q, k, v, lengths=lengths), decode_attention(q, k, v, kv_mask=mask))


@pytest.mark.parametrize("dtype", [torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else []))
def test_decode_half(dtype):
    q, k, v, mask = make_inputs(2, 8, 1, 1, 70, 64, dtype, True)
    got = decode_attention(q, k, v, kv_mask=mask)
    want = reference(q.double(), k.double(), v.double(), True, mask)
    torch.testing.assert_close(got.double(), want, atol=TOL[dtype], rtol=TOL[dtype])


def test_unsupported_inputs_raise():
    q, k, v, _ = make_inputs(1, 2, 1, 8, 8, 16, torch.float32, False)
    with pytest.raises(ValueError, match="head dim 24 is not supported"):
        flash_attention(torch.randn(1, 2, 8, 24), torch.randn(1, 1, 8, 24), torch.randn(1, 1, 8, 24))
    with pytest.raises(ValueError, match="share one dtype"):
        flash_attention(q, k.half(), v)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        flash_attention(torch.randn(1, 3, 8, 16), torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16))
    with pytest.raises(ValueError, match="kv_mask must be"):
        flash_attention(q, k, v, kv_mask=torch.ones(1, 5, dtype=torch.bool))


@pytest.mark.skipif(DEVICE != "cuda", reason="large shapes and autotuned tiles: GPU only")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d", [64, 128])
def test_gpu_large(dtype, d):
    check(2, 8, 1, 1000, 1000, d, dtype, True, True)
    check(2, 8, 2, 1024, 1024, d, dtype, False, False)


@pytest.mark.parametrize("n", [1, 17, 70])
@pytest.mark.parametrize("d", [8, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_rotary_matches_pytorch(n, d, dtype):
    """The fused rotary (forward and backward) == apply_rotary on the strided q/k view of a fused projection, with
    per-row positions (a left-padded row) as the model passes them."""
    from palm_rlhf.kernels import fused_rotary
    from palm_rlhf.palm import RotaryEmbedding, apply_rotary
    b, heads = 2, 5
    gen = torch.Generator().manual_seed(0)
    proj = torch.randn(b, n, heads * d + 3, generator=gen).to(DEVICE, dtype).requires_grad_()
    view = lambda t: t[..., : heads * d].view(b, n, heads, d).transpose(1, 2)  # noqa: E731  strided, as in the model
    positions = torch.stack([torch.arange(n), (torch.arange(n) - 3).clamp(min=0)]).to(DEVICE)
    cos, sin, _ = RotaryEmbedding(d).to(DEVICE)(positions)
    grad = torch.randn(b, heads, n, d, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    out = fused_rotary(view(proj), cos, sin)
    out.backward(grad)
    ref_proj = proj.detach().double().requires_grad_()
    ref = apply_rotary(view(ref_proj), cos.double(), sin.double())
    ref.backward(grad.double())
    tol = 1e-6 if dtype == torch.float32 else 2e-3   # fp16: one rounding of an O(1) result
    assert out.dtype == dtype and out.shape == (b, heads, n, d)
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
    torch.testing.assert_close(proj.grad.double(), ref_proj.grad, atol=tol, rtol=tol)  # the extra columns get 0


def test_fused_rotary_rejects_what_it_cannot_do():
    from palm_rlhf.kernels import fused_rotary
    x = torch.randn(1, 2, 3, 12, device=DEVICE)
    cos = torch.ones(1, 1, 3, 12, device=DEVICE)
    with pytest.raises(ValueError, match="power of two"):
        fused_rotary(x, cos, cos)
    with pytest.raises(ValueError, match="cos and sin must be"):
        fused_rotary(torch.randn(1, 2, 3, 16, device=DEVICE), cos, cos)
    with pytest.raises(ValueError, match="fp32, fp16 or bf16"):
        fused_rotary(torch.randn(1, 2, 3, 16, device=DEVICE, dtype=torch.float64), cos, cos)

