"""KV cache parity, ragged batches, EOS, samplers, determinism."""

import math

import pytest
import torch

from palm_rlhf import KVCache, PaLM, PaLMConfig, generate
from palm_rlhf.lora import add_lora, lora_layers, set_lora
from palm_rlhf.sampling import decode_one_token, left_pad, prefill, process_logits, sample, top_k, top_p


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return PaLM(PaLMConfig.preset("test")).eval()


def ragged_prompts():
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(0, 256, (n,), generator=gen) for n in (5, 1, 12, 8)]


@pytest.mark.parametrize("backend,shift", [("reference", False), ("sdpa", False), ("reference", True),
                                           ("sdpa", True)])
def test_cached_decode_equals_full_forward_every_position(backend, shift):
    """Logits from prefill + one-token decode steps == the full forward pass, every position, ragged batch, with and
    without token shift (whose state the cache carries from step to step)."""
    torch.manual_seed(0)
    m = PaLM(PaLMConfig.preset("test", attn_backend=backend, token_shift=shift)).eval()
    prompt, prompt_mask = left_pad(ragged_prompts())
    gen = torch.Generator().manual_seed(1)
    cont = torch.randint(0, 256, (4, 10), generator=gen)
    full = torch.cat((prompt, cont), 1)
    full_mask = torch.cat((prompt_mask, torch.ones_like(cont, dtype=torch.bool)), 1)
    want = m(full, mask=full_mask)
    cache = KVCache(m.config, 4, full.shape[1])
    with torch.no_grad():
        got = [prefill(m, prompt, prompt_mask, cache)]
        for t in range(cont.shape[1] - 1):
            got.append(decode_one_token(m, cont[:, t], torch.ones(4, dtype=torch.bool), cache))
    got = torch.stack(got, 1)
    torch.testing.assert_close(got, want[:, prompt.shape[1] - 1:-1], atol=1e-5, rtol=1e-5)


lean_decode = PaLM.decode


@pytest.mark.parametrize("kv_heads,lora,rows,shift", [(1, False, 4, False), (2, True, 4, False), (1, True, 1, False),
                                                    (1, False, 4, True), (2, True, 1, True)])
def test_lean_decode_step_equals_the_general_path(kv_heads, lora, rows, shift, monkeypatch):
    """PaLM.decode (one token per row, no autograd) == the general forward with the same cache, for multi- and
    grouped-query attention, a merged LoRA adapter, rows that stopped (real=False) among live ones (a stopped row's
    token-shift state must stay that of its last real token), and one row (which multiplies by transposed copies of
    the weights)."""
    torch.manual_seed(0)
    m = PaLM(PaLMConfig.preset("test", kv_heads=kv_heads, token_shift=shift)).eval()
    if lora:
        add_lora(m, "actor", r=4)
        for layer in lora_layers(m):
            torch.nn.init.normal_(layer.lora_B["actor"], std=0.2)
        set_lora(m, "actor")
    prompt, prompt_mask = left_pad(ragged_prompts()[:rows])
    steps = torch.randint(0, 256, (rows, 6), generator=torch.Generator().manual_seed(2))
    real = torch.tensor([[True, True, False, True][:rows]]).expand(6, rows).clone()
    real[3:, 0] = False                                                  # row 0 stops after 3 steps
    calls = []
    monkeypatch.setattr(PaLM, "decode", lambda self, *a, **k: calls.append(1) or lean_decode(self, *a, **k))
    out = {}
    for lean in (True, False):
        monkeypatch.setattr(PaLM, "lean_decode", lean)   # False: the general path (reference backend, autograd)
        cache = KVCache(m.config, rows, prompt.shape[1] + 6)
        with torch.no_grad():
            prefill(m, prompt, prompt_mask, cache)
            out[lean] = torch.stack([decode_one_token(m, steps[:, t], real[t], cache) for t in range(6)], 1)
        if lean:   # the transposed copies exist exactly for one row
            assert (0 in cache.decode_state) == (rows == 1)
        assert cache.length == prompt.shape[1] + 6 and torch.equal(cache.count, prompt_mask.sum(1) + real.sum(0))
    assert len(calls) == 6                                               # the lean path ran, and only when asked
    live = real.t()
    torch.testing.assert_close(out[True][live], out[False][live], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(out[True]).all()


def test_sampler_draws_from_the_distribution():
    """The inverse-CDF draw: frequencies match the probabilities and zero-probability tokens are never drawn."""
    probs = torch.tensor([0.1, 0.0, 0.45, 0.3, 0.0, 0.15])
    logits = probs.log().expand(40_000, -1)
    tokens, logp = sample(logits, 1.0, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(tokens, minlength=6) / tokens.numel()
    assert freq[1] == 0 and freq[4] == 0
    torch.testing.assert_close(freq, probs, atol=0.01, rtol=0)       # sd of each frequency <= 0.0025
    torch.testing.assert_close(logp, probs.log()[tokens])


def test_sampler_stays_in_range_when_the_uniform_number_reaches_the_total(monkeypatch):
    """u = rand * total can round up to the total: the draw is then the last token with probability > 0."""
    monkeypatch.setattr(torch, "rand", lambda *shape, **kw: torch.ones(*shape))
    tokens, logp = sample(torch.tensor([[0.3, 0.7, 0.0, 0.0]]).log(), 1.0)
    assert tokens.tolist() == [1] and logp.item() == pytest.approx(math.log(0.7))


def test_generations_are_ordinary_tensors(model):
    """Sampling runs in inference mode; what it returns must still feed training (autograd saves the token ids)."""
    out = generate(model, ragged_prompts(), 4, generator=torch.Generator().manual_seed(0))
    assert not any(t.is_inference() for t in (out.tokens, out.mask, out.logprobs, out.prompt, out.prompt_mask))
    seq, mask = out.sequences()
    model.train()
    model.loss(seq, mask=mask).backward()
    model.zero_grad(set_to_none=True)
    model.eval()


def test_cached_generation_equals_uncached(model):
    a = generate(model, ragged_prompts(), 15, temperature=0.0)
    b = generate(model, ragged_prompts(), 15, temperature=0.0, use_cache=False)
    assert torch.equal(a.tokens, b.tokens)
    torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-5, rtol=1e-5)


def test_ragged_batch_equals_each_row_alone(model):
    prompts = ragged_prompts()
    batch = generate(model, prompts, 12, temperature=0.0)
    for i, p in enumerate(prompts):
        alone = generate(model, [p], 12, temperature=0.0)
        assert torch.equal(alone.tokens[0], batch.tokens[i]), f"row {i} differs"
        torch.testing.assert_close(alone.logprobs[0], batch.logprobs[i], atol=1e-5, rtol=1e-5)


def test_each_row_stops_at_its_own_eos(model):
    prompts = ragged_prompts()
    free = generate(model, prompts, 20, temperature=0.0)
    eos = int(free.tokens[0, 3])  # row 0 emits this at step 3 (other rows may too, later or never)
    out = generate(model, prompts, 20, temperature=0.0, eos_token=eos)
    for i in range(len(prompts)):
        hits = (free.tokens[i] == eos).nonzero()
        stop = int(hits[0]) + 1 if len(hits) else out.tokens.shape[1]
        assert out.mask[i, :stop].all() and not out.mask[i, stop:].any()
        assert torch.equal(out.tokens[i, :stop], free.tokens[i, :stop])
        assert (out.logprobs[i, stop:] == 0).all()


def test_sampled_logprobs_are_those_of_the_sampling_distribution(model):
    """Re-score each sampled token under temperature/top-k/top-p processed logits of the full forward."""
    prompts = ragged_prompts()
    out = generate(model, prompts, 10, temperature=0.7, top_k=20, top_p=0.9,
                   generator=torch.Generator().manual_seed(0))
    seq, mask = out.sequences()
    logits = model(seq, mask=mask)[:, out.prompt.shape[1] - 1:-1]
    logp = process_logits(logits, 0.7, 20, 0.9).gather(-1, out.tokens[..., None]).squeeze(-1)
    torch.testing.assert_close(logp[out.mask], out.logprobs[out.mask], atol=1e-4, rtol=1e-4)
    assert torch.isfinite(out.logprobs).all()


def test_generator_makes_sampling_deterministic(model):
    a = generate(model, ragged_prompts(), 10, generator=torch.Generator().manual_seed(3))
    b = generate(model, ragged_prompts(), 10, generator=torch.Generator().manual_seed(3))
    c = generate(model, ragged_prompts(), 10, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a.tokens, b.tokens) and not torch.equal(a.tokens, c.tokens)


def test_top_k_and_top_p():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0]])
    assert torch.isinf(top_k(logits, 2)).tolist() == [[True, False, False, True]]
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    kept = ~torch.isinf(top_p(probs, 0.75))
    assert kept.tolist() == [[True, True, False, False]]  # 0.5 < 0.75 <= 0.8
    assert (~torch.isinf(top_p(probs, 0.1))).sum() == 1      # the top token always survives
    tokens, logp = sample(logits, 0.0)
    assert tokens.tolist() == [1] and logp.item() == pytest.approx(torch.log_softmax(logits, -1)[0, 1].item())


@pytest.mark.parametrize("kwargs,match", [
    (dict(prompts=[torch.tensor([], dtype=torch.long)]), "prompt 0 is empty"),
    (dict(prompts=[]), "no prompts"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(temperature=-1.0), "temperature"),
    (dict(top_p=1.5), "top_p"),
    (dict(max_new_tokens=200), "exceeds max_seq_len"),
    (dict(prompts=[torch.tensor([1, 300])]), "token ids must lie"),
])
def test_bad_generation_inputs(model, kwargs, match):
    args = dict(prompts=[torch.tensor([1, 2, 3])], max_new_tokens=4)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        generate(model, args.pop("prompts"), args.pop("max_new_tokens"), **args)
