"""PaLM: a decoder-only transformer as described in https://arxiv.org/abs/2204.02311.

Einsum / einops legend:
    b batch, n sequence (i queries, j keys), h query heads, g key/value heads, d head dimension, m model dimension.

Components, in the order they appear:
    LayerNorm without bias                                 (PaLM, section 2)
    rotary position embedding, optional xPos              https://arxiv.org/abs/2104.09864, https://arxiv.org/abs/2212.10554
    SwiGLU feedforward                                     https://arxiv.org/abs/2002.05202
    parallel attention + feedforward block, one pre-norm   (PaLM, section 2; GPT-J)
    multi-query attention (one shared k/v head)            https://arxiv.org/abs/1911.02150
    tied input / output embeddings, no biases anywhere.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from beartype import beartype
from einops import rearrange
from torch import Tensor, nn

from . import attention
from .attention import BACKENDS, attend
from .checkpoint import Checkpointable, register
from .lora import add_lora, adapter_configs, keep_scopes, merge_lora, weight_of
from .utils import exists

# ---------------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class PaLMConfig:
    num_tokens: int = 256          # bytes
    dim: int = 512
    depth: int = 8
    heads: int = 8
    dim_head: int = 64
    kv_heads: int = 1              # 1 = multi-query; heads % kv_heads == 0 gives grouped-query
    ff_mult: int = 4
    max_seq_len: int = 1024        # longest sequence the model accepts (rotary itself has no hard limit)
    rotary_base: float = 10000.0
    xpos: bool = False             # length-extrapolatable rotary (xPos)
    xpos_scale_base: int = 512
    qk_norm: bool = False          # LayerNorm on q and k per head (stabilises large learning rates)
    token_shift: bool = True       # half of each block's normed input comes from the previous real token
    dropout: float = 0.1           # on the embeddings and each block's residual branch, in training mode only
    attn_backend: str = "auto"     # see palm_rlhf.attention

    def __post_init__(self):
        for name in ("num_tokens", "dim", "depth", "heads", "dim_head", "kv_heads", "ff_mult", "max_seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"PaLMConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.heads % self.kv_heads != 0:
            raise ValueError(f"PaLMConfig.heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")
        if self.dim_head % 2 != 0:
            raise ValueError(f"PaLMConfig.dim_head must be even for rotary embeddings, got {self.dim_head}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"PaLMConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.attn_backend not in BACKENDS:
            raise ValueError(f"PaLMConfig.attn_backend must be one of {BACKENDS}, got {self.attn_backend!r}")

    @property
    def ff_inner(self) -> int:
        return self.dim * self.ff_mult

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "PaLMConfig":
        known = {f.name for f in fields(cls)}
        d = {**LEGACY_DEFAULTS, **d}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown PaLMConfig fields {sorted(unknown)}; known fields are {sorted(known)}")
        return cls(**d)

    @classmethod
    def preset(cls, name: str, **overrides) -> "PaLMConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


# fields a file written before they existed lacks, with the value that model was built with
LEGACY_DEFAULTS = {"token_shift": False, "dropout": 0.0}

PRESETS = {
    "test": dict(dim=32, depth=2, heads=4, dim_head=8, max_seq_len=128),                # unit tests
    "tiny": dict(dim=256, depth=4, heads=4, dim_head=64, max_seq_len=1024),             # benchmarks, PPO demo
    "cpu": dict(dim=256, depth=6, heads=4, dim_head=64, max_seq_len=512),               # enwik8 on a laptop CPU
    "enwik8": dict(dim=512, depth=8, heads=8, dim_head=64, max_seq_len=1024),           # lucidrains' enwik8 size
}

# ---------------------------------------------------------------------------------------------------- components


class LayerNorm(nn.Module):
    """LayerNorm with a learned gain and no bias (PaLM)."""

    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, x.shape[-1:], self.gamma)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding for explicit per-row positions, so left-padded batches rotate correctly."""

    def __init__(self, dim_head: int, base: float = 10000.0, xpos: bool = False, xpos_scale_base: int = 512):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, dim_head, 2).float() / dim_head))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.xpos = xpos
        self.xpos_scale_base = xpos_scale_base
        xpos_scale = (torch.arange(0, dim_head, 2).float() + 0.4 * dim_head) / (1.4 * dim_head)
        self.register_buffer("xpos_scale", xpos_scale, persistent=False)
        # the 2d entries of a flattened (d, d) rotation matrix R that are not zero: cos on the diagonal, and where
        # rotate-half takes each coordinate from, its signed sin (row (i + d/2) mod d of column i)
        i = torch.arange(dim_head)
        entries = torch.cat((i * dim_head + i, (i + dim_head // 2) % dim_head * dim_head + i))
        self.register_buffer("matrix_entries", entries, persistent=False)

    def matrix_table(self, length: int) -> Tensor:
        """(length, 2d): for each position, the values of R's matrix_entries (cos, then the signed sin)."""
        cos, sin, _ = self(torch.arange(length, device=self.inv_freq.device)[None])
        return torch.cat((cos[0, 0], sin[0, 0]), dim=-1)

    def matrix(self, positions: Tensor, table: Tensor, out: Tensor) -> Tensor:
        """positions (b,) -> out (b, d, d), the matrices R with x @ R == apply_rotary(x, cos, sin) (no xPos): their
        2d entries that are not zero copied from `table` (matrix_table). `out` is zero elsewhere and stays so, so one
        buffer serves every decode step."""
        out.view(out.shape[0], -1).index_copy_(1, self.matrix_entries, table.index_select(0, positions))
        return out

    def forward(self, positions: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """positions (b, n) -> cos, signed sin (b, 1, n, d) and, with xPos, the query scale (b, 1, n, d)."""
        freqs = positions.float()[..., None] * self.inv_freq                    # (b, n, d/2)
        cos, sin = freqs.cos(), freqs.sin()
        cos = torch.cat((cos, cos), dim=-1)[:, None]                              # (b, 1, n, d)
        sin = torch.cat((-sin, sin), dim=-1)[:, None]                             # sign of rotate-half folded in
        scale = None
        if self.xpos:
            scale = self.xpos_scale ** (positions.float()[..., None] / self.xpos_scale_base)
            scale = torch.cat((scale, scale), dim=-1)[:, None]
        return cos, sin, scale


def rotate(x: Tensor, cos: Tensor, sin: Tensor, backend: str | None = None) -> Tensor:
    """apply_rotary, or the same maths in one fused Triton pass where attention.use_fused_rotary says so."""
    if attention.use_fused_rotary(x, backend):
        from .kernels import fused_rotary
        return fused_rotary(x, cos, sin)
    return apply_rotary(x, cos, sin)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor, scale: Tensor | None = None) -> Tensor:
    """x * cos + rotate_half(x) * sin, computed in fp32 (cos/sin are fp32), returned in x's dtype."""
    x1, x2 = x.chunk(2, dim=-1)
    out = x * cos + torch.cat((x2, x1), dim=-1) * sin
    if scale is not None:
        out = out * scale
    return out.to(x.dtype)


class SwiGLU(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        x, gate = x.chunk(2, dim=-1)
        return F.silu(gate) * x


def shift_tokens(h: Tensor, mask: Tensor | None = None, state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Token shift (RWKV, arXiv 2305.13048; x-transformers' shift_tokens): h (b, n, dim) with its last
    dim - dim // 2 channels replaced by those of the previous real token, so every projection sees two tokens for
    the price of one. mask (b, n): real tokens (None: all); state (b, c): those channels of the last real token
    before this chunk (a KV cache's; None: zeros, the start of a sequence). Padding is skipped, so a padded row
    shifts exactly like its unpadded self. Returns the shifted h and the state after the chunk."""
    b, n, dim = h.shape
    keep, tail = h.split((dim // 2, dim - dim // 2), dim=-1)
    seq = torch.cat((state[:, None] if exists(state) else torch.zeros_like(tail[:, :1]), tail), dim=1)
    if mask is None:
        return torch.cat((keep, seq[:, :-1]), dim=-1), tail[:, -1]
    # index into seq of the last real token at or before each position (0: the state)
    last = torch.where(mask, torch.arange(1, n + 1, device=h.device), 0).cummax(dim=1).values
    before = F.pad(last[:, :-1], (1, 0))
    pick = lambda idx: seq.gather(1, idx[..., None].expand(-1, -1, seq.shape[-1]))  # noqa: E731
    return torch.cat((keep, pick(before)), dim=-1), pick(last[:, -1:])[:, 0]


def disable_dropout(module: nn.Module) -> nn.Module:
    """Every dropout in module set to p = 0 (in place): for training that compares one model's log-probs across
    passes (RL's rollout against its update, a policy against its reference), which must be the same function."""
    for m in module.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return module


class ParallelTransformerBlock(nn.Module):
    """x + attn(norm(x)) + ff(norm(x)), with q, k, v and the feedforward input from one fused projection."""

    fsdp_methods = ("decode",)  # see fsdp.shard

    def __init__(self, config: PaLMConfig):
        super().__init__()
        c = config
        self.config = c
        self.norm = LayerNorm(c.dim)
        self.fused_dims = (c.heads * c.dim_head, c.kv_heads * c.dim_head, c.kv_heads * c.dim_head, 2 * c.ff_inner)
        self.qk_v_ff_dims = (self.fused_dims[0] + self.fused_dims[1], self.fused_dims[2], self.fused_dims[3])
        self.to_fused = nn.Linear(c.dim, sum(self.fused_dims), bias=False)
        self.q_norm = LayerNorm(c.dim_head) if c.qk_norm else None
        self.k_norm = LayerNorm(c.dim_head) if c.qk_norm else None
        self.swiglu = SwiGLU()
        self.attn_out = nn.Linear(c.heads * c.dim_head, c.dim, bias=False)
        self.ff_out = nn.Linear(c.ff_inner, c.dim, bias=False)
        self.dropout = nn.Dropout(c.dropout)

    def forward(self, x: Tensor, rotary: tuple, kv_mask: Tensor | None = None, cache=None, layer: int = 0) -> Tensor:
        c = self.config
        b, n, _ = x.shape
        h, g = c.heads, c.kv_heads
        normed = self.norm(x)
        if c.token_shift:
            chunk_mask, state = (cache.chunk_mask(), cache.shift[layer]) if exists(cache) else (kv_mask, None)
            normed, state = shift_tokens(normed, chunk_mask, state)
            if exists(cache):
                cache.shift[layer] = state
        qk, v, ff = self.to_fused(normed).split(self.qk_v_ff_dims, dim=-1)
        # plain views rather than einops here: this runs once per layer per decoded token
        qk = qk.view(b, n, h + g, c.dim_head).transpose(1, 2)                    # (b, h + g, n, d)
        v = v.view(b, n, g, c.dim_head).transpose(1, 2)                          # (b, g, n, d)
        cos, sin, scale = rotary
        if exists(self.q_norm):
            qk = torch.cat((self.q_norm(qk[:, :h]), self.k_norm(qk[:, h:])), dim=1)
        if exists(scale):  # xPos scales queries up and keys down
            q, k = qk.split((h, g), dim=1)
            q, k = apply_rotary(q, cos, sin, scale), apply_rotary(k, cos, sin, scale.reciprocal())
        else:              # q and k are adjacent in the fused projection: rotate them in one go
            q, k = rotate(qk, cos, sin, c.attn_backend).split((h, g), dim=1)

        if exists(cache):
            k, v = cache.update(layer, k, v)                                      # (b, g, j, d): all keys so far
            kv_mask = cache.valid_mask()

        out = attend(q, k, v, causal=True, kv_mask=kv_mask, backend=c.attn_backend)
        out = out.transpose(1, 2).reshape(b, n, c.heads * c.dim_head)           # (b, n, h * d)
        branch = self.attn_out(out) + self.ff_out(self.swiglu(ff))
        return x + (self.dropout(branch) if self.training and self.dropout.p > 0 else branch)

    def decode(self, x: Tensor, rotation: Tensor, cache, layer: int) -> Tensor:
        """forward for one new token per row, x (b, dim), without autograd (PaLM.forward's decode step): the same
        maths in about half the ops, because it runs depth times per sampled token and on a CPU its cost is mostly
        per-op overhead and reading the weights (see `project` for how they are multiplied). Rotary is one batched
        matmul by per-row rotation matrices; k and v are written into the cache in place; attention masks with one
        additive bias that the cache keeps for every layer. Tests hold it equal to forward (test_sampling.py)."""
        c = self.config
        b, h, g, d = x.shape[0], c.heads, c.kv_heads, c.dim_head
        to_fused, attn_out, ff_out = decode_weights(cache, layer, self.to_fused, self.attn_out, self.ff_out)
        normed = F.layer_norm(x, x.shape[-1:], self.norm.gamma)
        if c.token_shift:  # the previous real token's channels; this token's become the state if it is real
            state = cache.shift[layer]
            keep, tail = normed.split((c.dim // 2, c.dim - c.dim // 2), dim=-1)
            normed = torch.cat((keep, state), dim=-1)
            state.copy_(torch.where(cache.chunk_mask(), tail, state))
        fused = project(normed, to_fused)                                                  # (b, fused dims)
        qkv = fused[:, :(h + 2 * g) * d].reshape(b, h + 2 * g, d).contiguous()            # (b, h + 2g, d)
        qk = torch.bmm(qkv[:, :h + g].float(), rotation).to(x.dtype)                      # rotary, in fp32
        k, v, bias = cache.append_one(layer, qk[:, h:], qkv[:, h + g:])                   # (b g, j, d), (b g, 1, j)
        q = qk[:, :h].reshape(b * g, h // g, d)
        attn = torch.baddbmm(bias, q, k.transpose(1, 2), alpha=d ** -0.5).softmax(dim=-1)
        out = torch.bmm(attn, v).view(b, h * d)
        ff, gate = fused[:, (h + 2 * g) * d:].chunk(2, dim=-1)                          # (b, ff_inner) each
        return x + project(out, attn_out) + project(F.silu(gate) * ff, ff_out)


def decode_weights(cache, key, *modules: nn.Module) -> list[Tensor]:
    """The transposed weights (in, out) of `modules` (adapters merged) for `project`: views, or, for one row on a
    CPU, contiguous copies made at the cache's first step and kept in its decode_state under `key` (so a generate call
    reads the weights once, and a cache serves one model)."""
    if cache.batch > 1 or cache.k.device.type != "cpu":
        return [weight_of(m).t() for m in modules]
    if key not in cache.decode_state:
        cache.decode_state[key] = [weight_of(m).t().contiguous() for m in modules]
    return cache.decode_state[key]


def project(x: Tensor, weight_t: Tensor) -> Tensor:
    """x (b, in) @ weight_t (in, out) for a decode step's few rows, laid out as MKL multiplies them fastest: a
    contiguous weight_t (decode_weights' copy for one row: about 2x faster than W @ x^T there) directly; a transposed
    view as W @ x^T, with x contiguous (1.3-2x faster than F.linear's x @ W^T from 2 rows on)."""
    if weight_t.is_contiguous():
        return x @ weight_t
    return (weight_t.t() @ x.contiguous().t()).t()

# ---------------------------------------------------------------------------------------------------- model


@register("palm")
class PaLM(Checkpointable, nn.Module):
    """The decoder. `PaLM.load(path)` returns the policy held in any palm-rlhf file (see checkpoint.py).

    policy_scope: the LoRA scope that, merged, makes this model the policy (SFT trains one; None: the base).
    """

    fsdp_methods = ("to_logits",)  # entry points besides forward that use the weights (see fsdp.shard)

    @beartype
    def __init__(self, config: PaLMConfig):
        super().__init__()
        self.config = config
        self.policy_scope: str | None = None
        self.token_emb = nn.Embedding(config.num_tokens, config.dim)
        self.emb_dropout = nn.Dropout(config.dropout)
        self.rotary = RotaryEmbedding(config.dim_head, config.rotary_base, config.xpos, config.xpos_scale_base)
        self.layers = nn.ModuleList([ParallelTransformerBlock(config) for _ in range(config.depth)])
        self.norm = LayerNorm(config.dim)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module):
        """Every matrix N(0, 1 / fan_in), PaLM's "fan-in variance scaling" (arXiv 2204.02311, section 2); the tied
        embedding N(0, 0.02). On enwik6 this learns faster per CPU-second than GPT-2's N(0, 0.02) with residual
        outputs scaled by 1 / sqrt(2 depth), which this model used before (benchmarks/bench_pretrain_race.py)."""
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=module.in_features ** -0.5)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    def config_dict(self) -> dict:
        scope = self.policy_scope
        adapters = adapter_configs(self)
        return {"kind": self.kind, "model": self.config.to_dict(), "adapters": adapters,
                "policy": {"prefix": "", "scope": scope, "lora": adapters.get(scope)}}

    @classmethod
    def from_config_dict(cls, config: dict) -> "PaLM":
        model = cls(PaLMConfig.from_dict(config["model"]))
        for scope, lora in config.get("adapters", {}).items():
            add_lora(model, scope, **lora)
        model.policy_scope = config.get("policy", {}).get("scope")
        return model

    @classmethod
    def from_file(cls, config: dict, weights: dict, source: str) -> "PaLM":
        """The policy in any palm-rlhf file: its PaLM weights with the policy's adapter (if any) merged; eval mode."""
        policy = config.get("policy") or {"prefix": "", "scope": None}
        prefix, scope = policy["prefix"], policy["scope"]
        mine = keep_scopes({k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)},
                           [scope] if scope else [])
        model = cls(PaLMConfig.from_dict(config["model"]))
        if scope:
            add_lora(model, scope, **policy["lora"])
        model.load_weights(mine, source)
        if scope:
            merge_lora(model, scope)
        return model.eval()

    @classmethod
    def policy_of(cls, model: Checkpointable) -> "PaLM":
        """A new plain PaLM holding the policy of `model` (a PaLM with an SFT adapter, an ActorCritic's actor, ...),
        its adapter merged; it shares no memory with `model`, and building it leaves the global RNG untouched."""
        with torch.random.fork_rng(devices=[]):
            return cls.from_file(model.config_dict(), model.weights(), type(model).__name__)

    def trainable_parameters(self) -> list:
        """Every weight not frozen (an SFT adapter freezes the base: then the adapter)."""
        return [p for p in self.parameters() if p.requires_grad]

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def check_tokens(self, tokens: Tensor) -> None:
        """Raise a clear error for input the model cannot take."""
        if not isinstance(tokens, Tensor):
            raise TypeError(f"tokens must be a torch.Tensor of token ids, got {type(tokens).__name__}")
        if tokens.dtype not in (torch.long, torch.int32, torch.int16, torch.uint8, torch.int8):
            raise ValueError(f"tokens must be an integer tensor (torch.long), got {tokens.dtype}; "
                             f"pass token ids, not embeddings or probabilities")
        if tokens.ndim != 2:
            raise ValueError(f"tokens must have shape (batch, seq), got {tuple(tokens.shape)}")
        if tokens.shape[1] == 0:
            raise ValueError("tokens is empty along the sequence axis: give at least one token")
        n = tokens.shape[1]
        if n > self.config.max_seq_len:
            raise ValueError(f"sequence of length {n} is longer than max_seq_len={self.config.max_seq_len}; "
                             f"truncate it or build the model with a larger max_seq_len")
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= self.config.num_tokens:
            raise ValueError(f"token ids must lie in [0, {self.config.num_tokens}), got values in [{lo}, {hi}]")

    def forward(self, tokens: Tensor, *, mask: Tensor | None = None, positions: Tensor | None = None,
                cache=None, return_hidden: bool = False, extra_embed: Tensor | None = None) -> Tensor:
        """tokens (b, n) -> logits (b, n, num_tokens), or final hidden states (b, n, dim) with return_hidden.

        mask (b, n): True for real tokens (padding anywhere, left padding for prompts). Positions default to the
        count of real tokens before each one, so a left-padded row rotates exactly like the unpadded row.
        cache: a `sampling.KVCache`; the tokens are appended to it and attend to everything cached before.
        extra_embed (b, n, dim): added to the token embeddings (e.g. the reward model's prompt/response segments).
        """
        offset = cache.length if exists(cache) else 0
        if offset == 0:  # cached decode steps feed back sampled ids; skip the (host-syncing) check there
            self.check_tokens(tokens)
        elif offset + tokens.shape[1] > cache.max_len:
            raise ValueError(f"KV cache holds {cache.max_len} positions; {offset} used, {tokens.shape[1]} more given")
        if exists(cache) and tokens.shape[1] == 1 and self.lean_decode and not torch.is_grad_enabled() and \
                not exists(positions) and not exists(extra_embed):
            return self.decode(tokens, mask, cache, return_hidden)
        if exists(cache):
            cache.append_mask(mask if exists(mask) else torch.ones_like(tokens, dtype=torch.bool))
        if not exists(positions):
            if exists(cache):
                positions = cache.next_positions(tokens.shape[1])
            elif exists(mask):
                positions = (mask.long().cumsum(dim=-1) - 1).clamp(min=0)
            else:
                positions = torch.arange(tokens.shape[1], device=tokens.device).expand(tokens.shape[0], -1)

        rotary = self.rotary(positions)
        x = self.token_emb(tokens.long())
        if exists(extra_embed):
            x = x + extra_embed
        if self.training and self.emb_dropout.p > 0:
            x = self.emb_dropout(x)
        for i, layer in enumerate(self.layers):
            x = layer(x, rotary, kv_mask=mask, cache=cache, layer=i)
        if exists(cache):
            cache.advance()
        x = self.norm(x)
        if return_hidden:
            return x
        return x @ self.token_emb.weight.t()                                        # tied output embedding

    @property
    def lean_decode(self) -> bool:
        """Whether one-token cached steps without autograd take `decode`: with the auto/sdpa attention backends (the
        reference and Triton backends keep their own decode attention), without qk_norm and xPos (it leaves those
        out)."""
        c = self.config
        return attention.requested(c.attn_backend) in ("auto", "sdpa") and not c.qk_norm and not c.xpos

    def decode(self, tokens: Tensor, mask: Tensor | None, cache, return_hidden: bool = False) -> Tensor:
        """forward for one new token per row (tokens (b, 1)) against the cache, without autograd: see
        ParallelTransformerBlock.decode. Returns logits (b, 1, num_tokens), or hidden states with return_hidden.
        forward has checked the tokens and the cache's room."""
        cache.append_mask(mask if exists(mask) else torch.ones_like(tokens, dtype=torch.bool))
        if "rotary" not in cache.decode_state:   # every position's rotation-matrix entries, a buffer to write them to
            d = self.config.dim_head
            cache.decode_state["rotary"] = (self.rotary.matrix_table(cache.max_len),
                                            torch.zeros(tokens.shape[0], d, d, device=tokens.device))
        rotation = self.rotary.matrix(cache.next_positions(1).view(-1), *cache.decode_state["rotary"])
        x = self.token_emb.weight.index_select(0, tokens.view(-1))                  # (b, dim)
        for i, layer in enumerate(self.layers):
            x = layer.decode(x, rotation, cache, i)
        cache.advance()
        x = F.layer_norm(x, x.shape[-1:], self.norm.gamma)
        if return_hidden:
            return x[:, None]
        return project(x, *decode_weights(cache, "output", self.token_emb))[:, None]   # tied output embedding

    def to_logits(self, hidden: Tensor) -> Tensor:
        """Final hidden states (forward's return_hidden) -> logits, through the tied output embedding."""
        return hidden @ self.token_emb.weight.t()

    def loss(self, tokens: Tensor, *, loss_mask: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        """Mean next-token cross entropy (nats). Every byte, 0 included, is a real target.

        loss_mask (b, n): which *target* tokens count (e.g. response tokens only, for SFT).
        """
        logits = self(tokens[:, :-1], mask=mask[:, :-1] if exists(mask) else None)
        return next_token_loss(logits, tokens[:, 1:], loss_mask[:, 1:] if exists(loss_mask) else None)


def next_token_loss(logits: Tensor, targets: Tensor, target_mask: Tensor | None = None) -> Tensor:
    """Cross entropy of logits (b, n, v) against targets (b, n), averaged over target_mask (all if None)."""
    loss = F.cross_entropy(rearrange(logits.float(), "b n v -> b v n"), targets.long(), reduction="none")
    if not exists(target_mask):
        return loss.mean()
    target_mask = target_mask.to(loss.dtype)
    return (loss * target_mask).sum() / target_mask.sum().clamp(min=1.0)
