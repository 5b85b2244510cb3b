"""LoRA: named scopes, switching per call, merge == unmerged, base checkpoints load unchanged."""

import pytest
import torch

from palm_rlhf import PaLM, PaLMConfig
from palm_rlhf.lora import add_lora, lora_parameters, merge_lora, set_lora, use_lora


@pytest.fixture
def model():
    torch.manual_seed(0)
    return PaLM(PaLMConfig.preset("test")).eval()


def perturb(params, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


def test_new_adapter_is_identity_and_names_are_kept(model):
    tokens = torch.randint(0, 256, (2, 10))
    base = model(tokens)
    names = set(model.state_dict())
    add_lora(model, "actor", r=4)
    assert names <= set(model.state_dict())  # base checkpoints still load
    with use_lora(model, "actor"):
        torch.testing.assert_close(model(tokens), base)  # B starts at zero


def test_scopes_are_independent_and_switchable(model):
    tokens = torch.randint(0, 256, (2, 10))
    base = model(tokens)
    actor = add_lora(model, "actor", r=4)
    critic = add_lora(model, "critic", r=2)
    perturb(actor, 0)
    perturb(critic, 1)
    with use_lora(model, "actor"):
        a = model(tokens)
        with use_lora(model):
            torch.testing.assert_close(model(tokens), base)  # reference policy = adapters off
        torch.testing.assert_close(model(tokens), a)       # restored on exit
    with use_lora(model, "critic"):
        c = model(tokens)
    assert not torch.allclose(a, base) and not torch.allclose(c, base) and not torch.allclose(a, c)
    torch.testing.assert_close(model(tokens), base)
    assert len(lora_parameters(model, "actor")) == 2 * 2 * model.config.depth  # A and B on 2 layers per block


def test_merge_equals_unmerged(model):
    tokens = torch.randint(0, 256, (2, 10))
    perturb(add_lora(model, "sft", r=4), 2)
    set_lora(model, "sft")
    unmerged = model(tokens)
    merge_lora(model, "sft")
    torch.testing.assert_close(model(tokens), unmerged, atol=1e-5, rtol=1e-5)
    fresh = PaLM(PaLMConfig.preset("test"))
    fresh.load_state_dict(model.state_dict())  # merged weights are a plain PaLM again
    torch.testing.assert_close(fresh.eval()(tokens), unmerged, atol=1e-5, rtol=1e-5)


def test_errors(model):
    add_lora(model, "a")
    with pytest.raises(ValueError, match="already exists"):
        add_lora(model, "a")
    with pytest.raises(ValueError, match="unknown LoRA scope"):
        set_lora(model, "b")
    with pytest.raises(ValueError, match="no LoRA scope 'b'"):
        merge_lora(model, "b")
    with pytest.raises(ValueError, match="no nn.Linear named"):
        add_lora(model, "c", targets=("nothing",))


def test_no_grad_path_uses_a_merged_weight_that_follows_every_update(model):
    """Without autograd the adapted layers run W + BA in one matmul; it must track optimizer steps and scope switches."""
    tokens = torch.randint(0, 256, (2, 10))
    actor = add_lora(model, "actor", r=4)
    critic = add_lora(model, "critic", r=4)
    perturb(actor + critic, 3)
    opt = torch.optim.AdamW(actor, lr=1e-2)
    layer = model.layers[0].to_fused
    for _ in range(2):
        for scope in ("actor", "critic", "actor"):
            with use_lora(model, scope):
                with torch.no_grad():
                    merged = model(tokens)
                    assert layer._merged is not None                 # the merged path ran
                unmerged = model(tokens)                             # autograd on: base + low-rank matmuls
            assert layer._merged is None                             # freed when the block closes
            # (each block rebuilds it; the in-place check below covers a change inside one block)
            torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)
        with use_lora(model, "actor"):
            model(tokens).logsumexp(-1).mean().backward()
        opt.step()                                                   # in-place update: the cache must notice
        opt.zero_grad()
    with use_lora(model, "actor"), torch.no_grad():
        a = model(tokens)
        with torch.no_grad():
            layer.lora_B["actor"].zero_()                            # any in-place change invalidates it
        assert not torch.equal(model(tokens), a)


def test_adapter_gradients_equal_those_of_the_merged_weight(model):
    """The training path (base matmul, the low-rank product added inside one GEMM) gives the gradients of
    x @ (W + B A * scale)^T for the adapters and the input, with two scopes on."""
    add_lora(model, "actor", r=4)
    add_lora(model, "critic", r=2)
    layer = model.layers[0].to_fused
    perturb([*layer.lora_A.values(), *layer.lora_B.values()], 4)
    set_lora(model, "actor", "critic")
    x = torch.randn(2, 5, layer.in_features, requires_grad=True)
    target = torch.randn(2, 5, layer.out_features)
    grads = []
    for merged in (False, True):
        params = [x, *layer.lora_A.values(), *layer.lora_B.values()]
        if merged:
            weight = layer.weight + sum(layer.delta(s) for s in layer.active)
            out = torch.nn.functional.linear(x, weight)
        else:
            out = layer(x)
        grads.append(torch.autograd.grad((out * target).sum(), params))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_adapted_layers_train_under_autocast(model):
    """Under bf16 autocast the adapters' product is added in the output's dtype; the result stays close to fp32's."""
    perturb(add_lora(model, "actor", r=4), 5)
    set_lora(model, "actor")
    tokens = torch.randint(0, 256, (2, 10))
    want = model(tokens)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = model(tokens)
    got.float().logsumexp(-1).mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in lora_parameters(model, "actor"))
    torch.testing.assert_close(got.float(), want, atol=0.1, rtol=0.05)
