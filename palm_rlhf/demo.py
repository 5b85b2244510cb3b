"""A checkable RLHF task: preferences labelled by a known "gold" judge, so every stage can be verified.

- prompts: windows of real text (enwik8 / enwik6);
- responses: samples from the pretrained model;
- gold judge: `gold_score`, a transparent preference a human labeller could plausibly hold, "prefers clean prose":
  the share of letters and spaces in the response, minus 0.05 for every piece of wiki markup
  ([[ ]] {{ }} | = * # < > and the entities &lt; &gt; &amp; &quot;);
- labels: the higher-scoring response of two is "chosen"; pairs closer than `min_gap` are skipped as ties; a
  fraction `flip` of labels is flipped at random to mimic noisy humans.
The reward model only ever sees the labelled pairs, never this function.
"""

from __future__ import annotations

import random

import torch
from torch import Tensor
from tqdm import tqdm

from .data import decode_bytes
from .sampling import generate

MARKUP = ("[[", "]]", "{{", "}}", "&lt;", "&gt;", "&amp;", "&quot;", "|", "=", "*", "#", "<", ">")


def gold_score(text: str) -> float:
    """Clean-prose score of a response: share of letters and spaces minus 0.05 per markup token."""
    if not text:
        return 0.0
    clean = sum(ch.isalpha() or ch == " " for ch in text) / len(text)
    return clean - 0.05 * sum(text.count(m) for m in MARKUP)


def gold_scores(tokens: Tensor, mask: Tensor) -> Tensor:
    """gold_score of each row's real tokens (bytes) -> (b,) float tensor."""
    return torch.tensor([gold_score(decode_bytes(t[m].tolist())) for t, m in zip(tokens.cpu(), mask.cpu())])


def prompt_windows(corpus: Tensor, n: int, length: int, seed: int) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(corpus) - length, (n,), generator=g).tolist()
    return [corpus[s:s + length].long() for s in starts]


@torch.no_grad()
def build_preferences(model, corpus: Tensor, *, pairs: int, prompt_len: int = 32, response_len: int = 64,
                      flip: float = 0.1, min_gap: float = 0.05, batch: int = 64, temperature: float = 1.0,
                      seed: int = 0, quiet: bool = False) -> tuple[list[dict], dict]:
    """Sample two responses per prompt and label each pair with the (noisy) gold judge."""
    rng = random.Random(seed)
    device = next(model.parameters()).device
    out, ties, flipped, drawn = [], 0, 0, 0
    bar = tqdm(total=pairs, desc="labelling pairs", disable=quiet)
    round_ = 0
    while len(out) < pairs:
        prompts = prompt_windows(corpus, batch // 2, prompt_len, seed * 7919 + round_)
        round_ += 1
        gen = generate(model, [p.to(device) for p in prompts for _ in range(2)], response_len,
                       temperature=temperature, generator=torch.Generator(device=device).manual_seed(seed + round_))
        texts = [decode_bytes(t[m].tolist()) for t, m in zip(gen.tokens.cpu(), gen.mask.cpu())]
        for i, prompt in enumerate(prompts):
            a, b = texts[2 * i], texts[2 * i + 1]
            drawn += 1
            ga, gb = gold_score(a), gold_score(b)
            if abs(ga - gb) < min_gap or not a or not b:
                ties += 1
                continue
            chosen, rejected = (a, b) if ga > gb else (b, a)
            if rng.random() < flip:
                chosen, rejected = rejected, chosen
                flipped += 1
            out.append({"prompt": decode_bytes(prompt.tolist()), "chosen": chosen, "rejected": rejected})
            bar.update(1)
            if len(out) == pairs:
                break
    bar.close()
    stats = {"pairs": len(out), "prompts_drawn": drawn, "ties_skipped": ties, "labels_flipped": flipped,
             "flip_rate": flipped / max(len(out), 1)}
    return out, stats


def build_demonstrations(corpus: Tensor, *, count: int, prompt_len: int = 32, response_len: int = 64,
                         keep_fraction: float = 0.3, seed: int = 0) -> list[dict]:
    """Demonstrations for SFT: real continuations of corpus windows, keeping the cleanest `keep_fraction`."""
    windows = prompt_windows(corpus, int(count / keep_fraction) + 1, prompt_len + response_len, seed + 1)
    rows = [{"prompt": decode_bytes(w[:prompt_len].tolist()), "response": decode_bytes(w[prompt_len:].tolist())}
            for w in windows]
    rows.sort(key=lambda r: gold_score(r["response"]), reverse=True)
    return [r for r in rows[:count] if r["prompt"] and r["response"]]

