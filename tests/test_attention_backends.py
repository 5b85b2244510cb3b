"""The model gives the same answers through every attention backend (Triton via the interpreter on CPU)."""

import pytest
import torch

from conftest import DEVICE

from palm_rlhf import PaLM, PaLMConfig, generate
from palm_rlhf.attention import _resolve, attend, reference_attention, sdpa_attention, visible_mask
from palm_rlhf.palm import next_token_loss

triton = pytest.importorskip("triton")


def tiny(backend, **kw):
    torch.manual_seed(0)
    return PaLM(PaLMConfig(dim=32, depth=2, heads=4, dim_head=16, max_seq_len=64, attn_backend=backend, **kw)).to(DEVICE)


def test_backends_agree_with_padding():
    tokens = torch.randint(0, 256, (3, 23), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    mask = torch.ones(3, 23, dtype=torch.bool, device=DEVICE)
    mask[0, :7] = False
    mask[2, :15] = False
    logits = {b: tiny(b)(tokens, mask=mask) for b in ("reference", "sdpa", "triton")}
    for b in ("sdpa", "triton"):
        real = mask[..., None].expand_as(logits[b])
        torch.testing.assert_close(logits[b][real], logits["reference"][real], atol=1e-4, rtol=1e-4)


def test_training_losses_match_reference():
    """A few AdamW steps with the Triton kernels (forward + backward) track the reference backend."""
    data = torch.randint(0, 256, (4, 33), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    losses = {}
    for backend in ("reference", "triton"):
        model = tiny(backend)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        losses[backend] = []
        for _ in range(4):
            loss = next_token_loss(model(data[:, :-1]), data[:, 1:])
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses[backend].append(loss.item())
    assert losses["triton"][-1] < losses["triton"][0]
    torch.testing.assert_close(torch.tensor(losses["triton"]), torch.tensor(losses["reference"]), atol=1e-4, rtol=1e-4)


def test_generation_identical_across_backends():
    """Greedy decoding with the Triton prefill + decode kernels picks the same tokens as SDPA."""
    prompts = [torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(n)).to(DEVICE) for n in (3, 9, 5)]
    outs = {b: generate(tiny(b), prompts, 12, temperature=0.0) for b in ("sdpa", "triton")}
    assert torch.equal(outs["sdpa"].tokens, outs["triton"].tokens)
    torch.testing.assert_close(outs["sdpa"].logprobs, outs["triton"].logprobs, atol=1e-4, rtol=1e-4)


def test_sdpa_equals_reference_every_mask_shape():
    gen = torch.Generator().manual_seed(0)
    for i, j, causal in [(5, 5, True), (1, 9, True), (4, 9, True), (6, 6, False)]:
        q = torch.randn(2, 4, i, 8, generator=gen)
        k, v = torch.randn(2, 1, j, 8, generator=gen), torch.randn(2, 1, j, 8, generator=gen)
        for kv_mask in (None, torch.rand(2, j, generator=gen) > 0.4):
            torch.testing.assert_close(sdpa_attention(q, k, v, causal, kv_mask),
                                       reference_attention(q, k, v, causal, kv_mask), atol=1e-5, rtol=1e-5)


def test_padding_query_sees_only_itself_and_no_nan():
    mask = torch.tensor([[False, False, True, True]])
    allowed = visible_mask(4, 4, True, mask, "cpu")[0]
    assert allowed[0].tolist() == [True, False, False, False]
    assert allowed[3].tolist() == [False, False, True, True]
    q, k, v = torch.randn(1, 2, 4, 8), torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 8)
    assert torch.isfinite(attend(q, k, v, kv_mask=mask, backend="reference")).all()


def test_backend_resolution(monkeypatch):
    q = torch.randn(1, 2, 3, 16)
    assert _resolve("auto", q) == "sdpa"  # CPU tensors never pick Triton automatically
    with pytest.raises(ValueError, match="unknown attention backend"):
        _resolve("flash9", q)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        _resolve("triton", q)


def test_fused_rotary_dispatch(monkeypatch):
    """Where the fused rotary runs: CUDA (any backend but the plain-PyTorch reference); on CPU only under the Triton
    interpreter with the triton backend; never for head dims whose half is not a power of two, or when switched off."""
    import palm_rlhf.attention as attention
    x = torch.randn(1, 5, 3, 16)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert attention.use_fused_rotary(x, "triton")
    assert not attention.use_fused_rotary(x, "sdpa") and not attention.use_fused_rotary(x, "reference")
    assert not attention.use_fused_rotary(torch.randn(1, 5, 3, 12), "triton")        # half = 6
    assert not attention.use_fused_rotary(x.double(), "triton")                       # fp64 keeps full precision
    monkeypatch.setattr(attention, "FUSED_ROTARY", False)
    assert not attention.use_fused_rotary(x, "triton")
    monkeypatch.setattr(attention, "FUSED_ROTARY", True)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not attention.use_fused_rotary(x, "triton")                                 # CPU tensor, no interpreter


from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(max_examples=40, deadline=None)
@given(i=st.integers(1, 9), extra=st.integers(0, 6), heads=st.sampled_from([(2, 1), (4, 2), (4, 4)]),
       causal=st.booleans(), padded=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_sdpa_equals_reference_property(i, extra, heads, causal, padded, seed):
    """For any shape, mask and alignment: SDPA and the reference agree, and no output is NaN."""
    gen = torch.Generator().manual_seed(seed)
    j = i + extra
    q = torch.randn(2, heads[0], i, 8, generator=gen)
    k, v = (torch.randn(2, heads[1], j, 8, generator=gen) for _ in range(2))
    kv_mask = torch.rand(2, j, generator=gen) > 0.5 if padded else None
    ref = reference_attention(q, k, v, causal, kv_mask)
    assert torch.isfinite(ref).all()
    torch.testing.assert_close(sdpa_attention(q, k, v, causal, kv_mask), ref, atol=1e-5, rtol=1e-5)
