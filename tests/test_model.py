"""PaLM: shapes, causality, masks and positions, configs, loss, bad inputs."""

import pytest
import torch

from palm_rlhf import PaLM, PaLMConfig, next_token_loss
from palm_rlhf.lora import LoRAConfig
from palm_rlhf.palm import shift_tokens
from palm_rlhf.policy import Policy


@pytest.fixture
def model():
    torch.manual_seed(0)
    return PaLM(PaLMConfig.preset("test")).eval()


def test_shapes_and_tied_embeddings(model):
    tokens = torch.randint(0, 256, (3, 11))
    assert model(tokens).shape == (3, 11, 256)
    assert model(tokens, return_hidden=True).shape == (3, 11, 32)
    logits = model(tokens)
    hidden = model(tokens, return_hidden=True)
    torch.testing.assert_close(logits, hidden @ model.token_emb.weight.t())
    assert not any("bias" in name for name, _ in model.named_parameters())


def test_initialisation_is_fan_in():
    """Every matrix N(0, 1 / fan_in) (PaLM's fan-in variance scaling), the tied embedding N(0, 0.02)."""
    torch.manual_seed(0)
    m = PaLM(PaLMConfig.preset("tiny"))
    for name, p in m.named_parameters():
        if p.ndim == 2:
            want = 0.02 if name == "token_emb.weight" else p.shape[1] ** -0.5
            assert abs(p.std().item() / want - 1) < 0.05 and abs(p.mean().item()) < 0.05 * want, name


def test_multi_query_projection_sizes():
    c = PaLMConfig(dim=64, depth=1, heads=8, dim_head=16, kv_heads=1)
    layer = PaLM(c).layers[0]
    assert layer.fused_dims == (8 * 16, 16, 16, 2 * 4 * 64)  # one k and one v head, never expanded


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_causal(backend):
    torch.manual_seed(0)
    m = PaLM(PaLMConfig.preset("test", attn_backend=backend)).eval()
    tokens = torch.randint(0, 256, (2, 20))
    changed = tokens.clone()
    changed[:, 12] = (changed[:, 12] + 1) % 256
    a, b = m(tokens), m(changed)
    torch.testing.assert_close(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_left_padding_is_invisible(model):
    """A left-padded row gives the same logits on its real tokens as the row alone (positions restart at 0)."""
    row = torch.randint(0, 256, (1, 9))
    padded = torch.cat((torch.full((1, 4), 7), row), dim=1)
    mask = torch.cat((torch.zeros(1, 4, dtype=torch.bool), torch.ones(1, 9, dtype=torch.bool)), dim=1)
    torch.testing.assert_close(model(padded, mask=mask)[:, 4:], model(row), atol=1e-5, rtol=1e-5)


def test_token_shift_by_hand():
    """shift_tokens: the first half of the channels stay, the second half is the previous real token's (zeros, or the
    state, before the first), padding skipped wherever it lies; the state is the last real token's half."""
    h = torch.arange(1, 25, dtype=torch.float).view(1, 6, 4)               # token t: channels 4t+1 .. 4t+4
    out, state = shift_tokens(h)
    assert out[0, :, :2].tolist() == h[0, :, :2].tolist()
    assert out[0, :, 2:].tolist() == [[0, 0], [3, 4], [7, 8], [11, 12], [15, 16], [19, 20]]
    assert state.tolist() == [[23, 24]]
    mask = torch.tensor([[False, True, True, False, False, True]])         # left and middle padding
    out, state = shift_tokens(h, mask, torch.tensor([[-1.0, -2.0]]))
    assert out[0, mask[0], 2:].tolist() == [[-1, -2], [7, 8], [11, 12]] and state.tolist() == [[23, 24]]
    out, state = shift_tokens(h[:, :1], torch.tensor([[False]]), torch.tensor([[-1.0, -2.0]]))
    assert state.tolist() == [[-1, -2]]                                    # a padded step keeps the state


def test_token_shift_is_causal_and_padding_anywhere_is_invisible():
    torch.manual_seed(0)
    m = PaLM(PaLMConfig.preset("test", token_shift=True)).eval()
    row = torch.randint(0, 256, (1, 12))
    padded = torch.cat((torch.full((1, 3), 7), row[:, :5], torch.full((1, 2), 9), row[:, 5:]), dim=1)
    mask = torch.ones_like(padded, dtype=torch.bool)
    mask[:, :3] = mask[:, 8:10] = False
    torch.testing.assert_close(m(padded, mask=mask)[mask], m(row)[0], atol=1e-5, rtol=1e-5)
    changed = row.clone()                                                  # still causal
    changed[:, 6] = (changed[:, 6] + 1) % 256
    torch.testing.assert_close(m(row)[:, :6], m(changed)[:, :6])
    plain = PaLM(PaLMConfig.preset("test", token_shift=False)).eval()      # the same weights, no shift
    plain.load_state_dict(m.state_dict())
    assert not torch.allclose(plain(row), m(row), atol=1e-3)


def test_files_without_token_shift_or_dropout_load_as_they_were_built():
    """A config dict written before token_shift and dropout existed describes a model without them."""
    old = PaLMConfig.preset("test").to_dict()
    del old["token_shift"], old["dropout"]
    assert (PaLMConfig.from_dict(old).token_shift, PaLMConfig.from_dict(old).dropout) == (False, 0.0)
    assert PaLMConfig.from_dict({**old, "token_shift": True}).token_shift is True


def test_dropout_only_in_training_mode_and_policies_switch_it_off():
    torch.manual_seed(0)
    m = PaLM(PaLMConfig.preset("test", dropout=0.5))
    none = PaLM(PaLMConfig.preset("test", dropout=0.0))
    none.load_state_dict(m.state_dict())
    tokens = torch.randint(0, 256, (2, 16))
    assert not torch.allclose(m.train()(tokens), m(tokens))                    # a fresh mask each pass
    torch.testing.assert_close(m.eval()(tokens), none.eval()(tokens))         # eval: the same function as p = 0
    policy = Policy(m.train(), lora=LoRAConfig(r=0))                          # RL needs one function per weights
    torch.testing.assert_close(policy.palm(tokens), none.eval()(tokens))
    with pytest.raises(ValueError, match="dropout"):
        PaLMConfig(dropout=1.0)


def test_qk_norm_and_xpos_and_gqa_run_and_stay_causal():
    torch.manual_seed(0)
    config = PaLMConfig(dim=32, depth=2, heads=4, dim_head=8, kv_heads=2, qk_norm=True, xpos=True, max_seq_len=64)
    m = PaLM(config).eval()
    tokens = torch.randint(0, 256, (2, 16))
    changed = tokens.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 256
    torch.testing.assert_close(m(tokens)[:, :-1], m(changed)[:, :-1])


def test_loss_counts_byte_zero():
    """Token 0 is a real byte: a model made to predict 0 has lower loss on zeros than on other bytes."""
    logits = torch.full((1, 4, 256), -10.0)
    logits[..., 0] = 10.0
    zeros = torch.zeros(1, 4, dtype=torch.long)
    ones = torch.ones(1, 4, dtype=torch.long)
    assert next_token_loss(logits, zeros) < 1e-3
    assert next_token_loss(logits, ones) > 10


def test_loss_mask_excludes_tokens():
    logits = torch.randn(2, 5, 256)
    targets = torch.randint(0, 256, (2, 5))
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[:, 3:] = True
    want = next_token_loss(logits[:, 3:], targets[:, 3:])
    torch.testing.assert_close(next_token_loss(logits, targets, mask), want)


def test_overfits_a_tiny_corpus():
    torch.manual_seed(0)
    m = PaLM(PaLMConfig.preset("test"))
    data = torch.tensor(list(b"the quick brown fox jumps over the lazy dog. " * 2))[None]
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    first = m.loss(data).item()
    for _ in range(60):
        loss = m.loss(data)
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert first > 5.0 and loss.item() < 1.0, (first, loss.item())


@pytest.mark.parametrize("bad,match", [
    (torch.tensor([[1, 2, 256]]), r"token ids must lie in \[0, 256\)"),
    (torch.tensor([[-1, 2]]), r"token ids must lie in"),
    (torch.randn(1, 4), "integer tensor"),
    (torch.zeros(1, 0, dtype=torch.long), "empty"),
    (torch.zeros(1, 129, dtype=torch.long), "longer than max_seq_len=128"),
    (torch.zeros(4, dtype=torch.long), r"shape \(batch, seq\)"),
])
def test_bad_tokens_raise_clear_errors(model, bad, match):
    with pytest.raises(ValueError, match=match):
        model(bad)


def test_config_validation_and_presets():
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        PaLMConfig(heads=6, kv_heads=4)
    with pytest.raises(ValueError, match="unknown preset"):
        PaLMConfig.preset("huge")
    with pytest.raises(ValueError, match="unknown PaLMConfig fields"):
        PaLMConfig.from_dict({"dim": 8, "dimm": 3})
    with pytest.raises(ValueError, match="attn_backend"):
        PaLMConfig(attn_backend="flash")
    c = PaLMConfig.preset("enwik8")
    assert (c.dim, c.depth, c.heads, c.dim_head) == (512, 8, 8, 64)
    assert PaLMConfig.from_dict(c.to_dict()) == c
