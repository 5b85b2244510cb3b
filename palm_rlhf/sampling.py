"""KV-cached batched sampling (after gpt-fast's generate.py, https://github.com/pytorch-labs/gpt-fast).

Prompts of different lengths are left-padded; each row's positions count only its real tokens, so a padded row
generates exactly what it would generate alone. Each row stops at its own EOS. Every sampled token comes with its
log-probability under exactly the distribution it was drawn from (after temperature, top-k and top-p), which is
what PPO's importance ratio needs.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .fsdp import is_sharded
from .utils import exists


class KVCache:
    """Preallocated keys/values for every layer: (depth, b, g, max_len, d), g = kv_heads (1 for multi-query).
    `update` serves the general forward; `append_one` the lean one-token step (PaLM.decode), which also reads the
    additive attention mask kept here (0 = a real key, -inf = padding, updated as columns are filled)."""

    def __init__(self, config, batch: int, max_len: int, device=None, dtype=torch.float32):
        if max_len > config.max_seq_len:
            raise ValueError(f"prompt + new tokens = {max_len} positions exceeds max_seq_len={config.max_seq_len}; "
                             f"shorten the prompt or ask for fewer new tokens")
        shape = (config.depth, batch, config.kv_heads, max_len, config.dim_head)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.mask = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.count = torch.zeros(batch, dtype=torch.long, device=device)  # real tokens cached per row
        self.batch, self.max_len = batch, max_len
        self.length = 0   # columns filled
        self._n = 0       # columns being appended by the forward pass in flight
        self._positions = None
        # for append_one: per-layer views, and the additive attention mask (b g, 1, max_len): 0 = visible
        self._layers = [(k, v, k.flatten(0, 1), v.flatten(0, 1)) for k, v in zip(self.k, self.v)]
        self._bias = torch.full((batch, config.kv_heads, 1, max_len), -torch.inf, device=device, dtype=dtype)
        self.decode_state = {}  # what PaLM.decode makes at its first step and keeps: the rotary table, weight copies
        # token shift: each layer's shifted channels of the last real token (palm.shift_tokens' state)
        self.shift = torch.zeros(config.depth, batch, config.dim - config.dim // 2, device=device, dtype=dtype) \
            if config.token_shift else None

    def append_mask(self, mask: Tensor) -> None:
        n = mask.shape[1]
        self.mask[:, self.length:self.length + n] = mask
        self._positions = (self.count[:, None] + mask.long().cumsum(dim=-1) - 1).clamp(min=0)
        self._n = n
        if n == 1:  # a decode step sees its own column whether or not it is real (attention.py's rule)
            self._bias[..., self.length] = 0.0

    def next_positions(self, n: int) -> Tensor:
        return self._positions

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        end = self.length + self._n
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def append_one(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """A one-token step's k, v (b, g, d) written in place; returns every key and value so far (b g, j, d) and the
        step's additive attention mask (b g, 1, j): 0 where the new token may look (real keys and itself), -inf
        elsewhere (kept up to date by append_mask and advance, shared by every layer)."""
        t = self.length
        cache_k, cache_v, flat_k, flat_v = self._layers[layer]
        cache_k.select(2, t).copy_(k)
        cache_v.select(2, t).copy_(v)
        return flat_k[:, :t + 1], flat_v[:, :t + 1], self._bias.view(-1, 1, self.max_len)[..., :t + 1]

    def chunk_mask(self) -> Tensor:
        """(b, n): which of the tokens being appended are real (n = 1 in a decode step)."""
        return self.mask[:, self.length:self.length + self._n]

    def valid_mask(self) -> Tensor:
        return self.mask[:, :self.length + self._n]

    def advance(self) -> None:
        new = self.mask[:, self.length:self.length + self._n]
        self.count += new.sum(dim=-1)
        self._bias[:, :, 0, self.length:self.length + self._n] = torch.where(new, 0.0, -torch.inf)[:, None]
        self.length += self._n
        self._n = 0

# ---------------------------------------------------------------------------------------------------- samplers


def top_k(logits: Tensor, k: int) -> Tensor:
    """Keep the k largest logits of each row, set the rest to -inf."""
    k = min(k, logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p(logits: Tensor, p: float) -> Tensor:
    """Nucleus filtering: keep the smallest set of tokens whose probability mass reaches p (the top token always)."""
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = (cum - sorted_logits.softmax(dim=-1)) >= p       # mass before this token already reaches p
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def process_logits(logits: Tensor, temperature: float = 1.0, k: int | None = None, p: float | None = None) -> Tensor:
    """Log-probabilities of the distribution tokens are sampled from. Greedy (temperature 0) scores under T=1."""
    logits = logits.float()
    if temperature > 0 and temperature != 1:
        logits = logits / temperature
    if exists(k):
        logits = top_k(logits, k)
    if exists(p):
        logits = top_p(logits, p)
    return F.log_softmax(logits, dim=-1)


def sample(logits: Tensor, temperature: float = 1.0, k: int | None = None, p: float | None = None,
           generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """logits (b, v) -> sampled tokens (b,) and their log-probabilities (b,) under the sampling distribution."""
    logprobs = process_logits(logits, temperature, k, p)
    if temperature == 0:
        tokens = logprobs.argmax(dim=-1)
    else:  # inverse CDF: one uniform number per row (torch.multinomial costs 3x as much on a CPU, per decode step)
        cdf = logprobs.exp().cumsum(dim=-1)
        total = cdf[:, -1:].contiguous()
        u = torch.rand(cdf.shape[0], 1, generator=generator, device=cdf.device) * total
        # the first cdf > u (so zero-probability tokens are never drawn), at most the last token with probability > 0
        # (u can round up to the total)
        tokens = torch.minimum(torch.searchsorted(cdf, u, right=True), torch.searchsorted(cdf, total)).squeeze(-1)
    return tokens, logprobs.gather(-1, tokens[:, None]).squeeze(-1)

# ---------------------------------------------------------------------------------------------------- generation


@dataclass
class Generation:
    tokens: Tensor      # (b, t) generated tokens; padding after a row's EOS
    mask: Tensor        # (b, t) True for real generated tokens (the EOS itself included)
    logprobs: Tensor    # (b, t) log-prob of each token under its sampling distribution (0 where mask is False)
    prompt: Tensor      # (b, p) left-padded prompts
    prompt_mask: Tensor  # (b, p)

    def sequences(self) -> tuple[Tensor, Tensor]:
        """Prompt and response joined: (b, p + t) tokens and mask (left-padded prompt, right-padded response)."""
        return torch.cat((self.prompt, self.tokens), dim=1), torch.cat((self.prompt_mask, self.mask), dim=1)


def left_pad(prompts, pad_token: int = 0, device=None) -> tuple[Tensor, Tensor]:
    """A list of 1-D token tensors -> left-padded (b, n) tokens and mask."""
    if isinstance(prompts, Tensor):
        if prompts.ndim != 2:
            raise ValueError(f"prompts must be a list of 1-D tensors or a (batch, seq) tensor, got {tuple(prompts.shape)}")
        prompts = list(prompts)
    if len(prompts) == 0:
        raise ValueError("no prompts given")
    for i, p in enumerate(prompts):
        if not isinstance(p, Tensor) or p.ndim != 1:
            raise ValueError(f"prompt {i} must be a 1-D tensor of token ids")
        if p.numel() == 0:
            raise ValueError(f"prompt {i} is empty: every prompt needs at least one token (e.g. a BOS or newline byte)")
    n = max(p.numel() for p in prompts)
    device = device if exists(device) else prompts[0].device
    tokens = torch.full((len(prompts), n), pad_token, dtype=torch.long, device=device)
    mask = torch.zeros((len(prompts), n), dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        tokens[i, n - p.numel():] = p
        mask[i, n - p.numel():] = True
    return tokens, mask


def prefill(model, tokens: Tensor, mask: Tensor, cache: KVCache) -> Tensor:
    """Run the prompts through the model, filling the cache; returns the logits of the last column (b, v)."""
    return model(tokens, mask=mask, cache=cache)[:, -1]


def decode_one_token(model, token: Tensor, real: Tensor, cache: KVCache) -> Tensor:
    """Feed one token per row (real=False for rows that already stopped); returns next-token logits (b, v)."""
    return model(token[:, None], mask=real[:, None], cache=cache)[:, -1]


def generate(model, prompts, max_new_tokens: int, *, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, eos_token: int | None = None, pad_token: int = 0,
             generator: torch.Generator | None = None, use_cache: bool = True, cache_dtype=None,
             on_token: Callable[[Tensor, Tensor], None] | None = None) -> Generation:
    """Sample up to `max_new_tokens` for every prompt (a list of 1-D tensors, or a (b, n) tensor of equal length).

    use_cache=False re-runs the whole sequence every step (the slow reference path; same outputs).
    on_token(tokens (b,), real (b,)): called after each step, e.g. to stream text (it costs a host sync per step).
    Sampling runs under torch.inference_mode (on a CPU a decode step is mostly per-op overhead, which inference mode
    cuts by a fifth; a sharded FSDP model samples under no_grad); the returned tensors are ordinary ones, free to use
    in training.
    """
    with torch.no_grad() if is_sharded(model) else torch.inference_mode():  # FSDP's gathers must not be inference
        gen = _generate(model, prompts, max_new_tokens, temperature, top_k, top_p, eos_token, pad_token, generator,
                        use_cache, cache_dtype, on_token)
    return Generation(*(getattr(gen, f.name).clone() for f in fields(gen)))  # clones leave inference mode


def _generate(model, prompts, max_new_tokens, temperature, top_k, top_p, eos_token, pad_token, generator, use_cache,
              cache_dtype, on_token) -> Generation:
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if exists(top_p) and not 0 < top_p <= 1:
        raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
    if exists(top_k) and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    device = next(model.parameters()).device
    prompt, prompt_mask = left_pad(prompts, pad_token, device)
    model.check_tokens(prompt)
    b, n = prompt.shape
    if n + max_new_tokens > model.config.max_seq_len:
        raise ValueError(f"prompt length {n} + max_new_tokens {max_new_tokens} exceeds max_seq_len="
                         f"{model.config.max_seq_len}")

    was_training = model.training
    model.eval()
    cache = None
    if use_cache:
        dtype = cache_dtype or next(model.parameters()).dtype
        cache = KVCache(model.config, b, n + max_new_tokens, device=device, dtype=dtype)
        logits = prefill(model, prompt, prompt_mask, cache)
    else:
        logits = model(prompt, mask=prompt_mask)[:, -1]

    tokens = torch.full((b, max_new_tokens), pad_token, dtype=torch.long, device=device)
    mask = torch.zeros((b, max_new_tokens), dtype=torch.bool, device=device)
    logprobs = torch.zeros((b, max_new_tokens), device=device)
    finished = torch.zeros(b, dtype=torch.bool, device=device)
    steps = max_new_tokens
    for t in range(max_new_tokens):
        token, logprob = sample(logits, temperature, top_k, top_p, generator)
        real = ~finished
        tokens[:, t] = torch.where(real, token, pad_token)
        mask[:, t] = real
        logprobs[:, t] = torch.where(real, logprob, 0.0)
        if exists(on_token):
            on_token(tokens[:, t], real)
        if exists(eos_token):
            finished = finished | (token == eos_token)
            if t % 8 == 7 and bool(finished.all()):  # a host sync, so only every 8 steps
                steps = t + 1
                break
        if t == max_new_tokens - 1:
            break
        if use_cache:
            logits = decode_one_token(model, tokens[:, t], real, cache)
        else:
            seq = torch.cat((prompt, tokens[:, :t + 1]), dim=1)
            seq_mask = torch.cat((prompt_mask, mask[:, :t + 1]), dim=1)
            logits = model(seq, mask=seq_mask)[:, -1]
    model.train(was_training)
    return Generation(tokens[:, :steps], mask[:, :steps], logprobs[:, :steps], prompt, prompt_mask)
