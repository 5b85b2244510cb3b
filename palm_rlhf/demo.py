"""Checkable RLHF tasks: preferences labelled by a known "gold" judge, so every stage can be verified.

- prompts: windows of real text (enwik8 / enwik6);
- responses: samples from the pretrained model;
- gold judge (judges.py): `prose` ("prefers clean prose", the default) or `sentiment` (VADER: the controlled-
  sentiment task), or any function `module:function`;
- labels: the higher-scoring response of two is "chosen"; pairs closer than `min_gap` are skipped as ties; a
  fraction `flip` of labels is flipped at random to mimic noisy humans.
The reward model only ever sees the labelled pairs, never the judge; trainers take it as a plain callable
(`gold_fn=judges.sentiment`), so nothing in the training stages depends on this module.
"""

from __future__ import annotations

import json
import random
from itertools import combinations
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from .data import decode_bytes, prompt_windows
from .judges import Judge, load_judge, prose
from .sampling import generate
from .utils import atomic_write_text, option, require, write_jsonl

def check_tie_rate(kept: int, drawn: int, wanted: int, what: str) -> None:
    """Stop a labelling loop that cannot finish: a judge that calls (nearly) every pair a tie would loop forever."""
    if drawn >= 1000 and kept * 1000 < drawn:
        raise ValueError(f"the judge called {drawn - kept} of {drawn} {what} pairs a tie (gap < min_gap), so {wanted} "
                         f"pairs would take too long: use a judge that tells these responses apart, or a smaller "
                         f"--min-gap")


@torch.no_grad()
def build_preferences(model, corpus: Tensor, *, pairs: int, prompt_len: int = 32, response_len: int = 64,
                      flip: float = 0.1, min_gap: float = 0.05, batch: int = 64, temperature: float = 1.0,
                      seed: int = 0, quiet: bool = False, judge: Judge = prose,
                      per_prompt: int = 2) -> tuple[list[dict], dict]:
    """Sample `per_prompt` responses per prompt and label every pair of them with the (noisy) gold judge (more
    than two per prompt gives more pairs per sample, for judges that call most pairs a tie)."""
    rng = random.Random(seed)
    device = next(model.parameters()).device
    out, ties, flipped, drawn = [], 0, 0, 0
    bar = tqdm(total=pairs, desc="labelling pairs", disable=quiet)
    round_ = 0
    while len(out) < pairs:
        check_tie_rate(len(out), drawn, pairs, "sampled")
        prompts = prompt_windows(corpus, max(1, batch // per_prompt), prompt_len, seed * 7919 + round_)
        round_ += 1
        gen = generate(model, [p.to(device) for p in prompts for _ in range(per_prompt)], response_len,
                       temperature=temperature, generator=torch.Generator(device=device).manual_seed(seed + round_))
        texts = [decode_bytes(t[m].tolist()) for t, m in zip(gen.tokens.cpu(), gen.mask.cpu())]
        for i, prompt in enumerate(prompts):
            for a, b in combinations(texts[per_prompt * i:per_prompt * (i + 1)], 2):
                drawn += 1
                ga, gb = judge(a), judge(b)
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
            if len(out) == pairs:
                break
    bar.close()
    stats = {"pairs": len(out), "pairs_drawn": drawn, "ties_skipped": ties, "labels_flipped": flipped,
             "flip_rate": flipped / max(len(out), 1)}
    return out, stats


def build_demonstrations(corpus: Tensor, *, count: int, prompt_len: int = 32, response_len: int = 64,
                         keep_fraction: float = 0.3, seed: int = 0, judge: Judge = prose) -> list[dict]:
    """Demonstrations for SFT: real continuations of corpus windows, keeping the `keep_fraction` the judge likes
    best."""
    windows = prompt_windows(corpus, int(count / keep_fraction) + 1, prompt_len + response_len, seed + 1)
    rows = [{"prompt": decode_bytes(w[:prompt_len].tolist()), "response": decode_bytes(w[prompt_len:].tolist())}
            for w in windows]
    rows.sort(key=lambda r: judge(r["response"]), reverse=True)
    return [r for r in rows[:count] if r["prompt"] and r["response"]]


def corpus_preferences(corpus: Tensor, *, pairs: int, judge: Judge, prompt_len: int = 32, response_len: int = 64,
                       min_gap: float = 0.05, seed: int = 0) -> list[dict]:
    """Pairs of real continuations, no model needed: two random windows of the corpus, each `response_len` bytes
    after a `prompt_len`-byte prompt; the continuation the judge scores higher is chosen, under the first window's
    prompt (ties skipped). For a word-level judge they show far more scored words per pair than a small model's
    samples do (README, the sentiment task)."""
    out, drawn = [], 0
    while len(out) < pairs:
        check_tie_rate(len(out), 256 * drawn, pairs, "corpus")
        windows = prompt_windows(corpus, 2 * 256, prompt_len + response_len, seed * 7919 + 1_000_003 + drawn)
        drawn += 1
        for a, b in zip(windows[0::2], windows[1::2]):
            ra, rb = decode_bytes(a[prompt_len:].tolist()), decode_bytes(b[prompt_len:].tolist())
            ga, gb = judge(ra), judge(rb)
            if abs(ga - gb) < min_gap or not ra or not rb:
                continue
            out.append({"prompt": decode_bytes(a[:prompt_len].tolist()), "chosen": ra if ga > gb else rb,
                        "rejected": rb if ga > gb else ra})
            if len(out) == pairs:
                break
    return out


@dataclass
class PreferenceTaskConfig:
    judge: str = option("prose", "gold judge: prose, sentiment (VADER; pip install -e \".[sentiment]\") or "
                        "module:function (text -> float)")
    pairs: int = option(3000, "training pairs to label")
    val_pairs: int = option(400, "held-out pairs to label")
    demos: int = option(2000, "SFT demonstrations to write (the real continuations the judge likes best)")
    prompt_len: int = option(32, "prompt bytes (windows of the corpus)")
    response_len: int = option(64, "response bytes sampled from the model")
    per_prompt: int = option(2, "responses sampled per prompt; every pair of them is labelled (ties skipped)")
    corpus_pairs: int = option(0, "also this many training pairs of real continuations of the corpus (two random "
                                  "windows, the judge picks; no label noise), shuffled in; the sampled ones alone "
                                  "also go to train_sampled.jsonl")
    flip: float = option(0.1, "share of labels flipped at random (noisy labellers)")
    min_gap: float = option(0.05, "gold-score gap below which a pair is a tie (skipped)")
    batch_size: int = option(64, "responses sampled at once")
    seed: int = option(0, "seed of prompts, samples and label noise")
    quiet: bool = option(False, "no progress bar")

    def __post_init__(self):
        for name in ("pairs", "val_pairs", "prompt_len", "response_len", "batch_size"):
            require(getattr(self, name) >= 1, self, name, "must be >= 1")
        require(self.per_prompt >= 2, self, "per_prompt", "must be >= 2 (a pair needs two responses)")
        require(self.batch_size % self.per_prompt == 0, self, "batch_size",
                f"must be a multiple of per_prompt ({self.per_prompt})")
        require(0 <= self.flip <= 1, self, "flip", "must lie in [0, 1]")
        require(self.corpus_pairs >= 0, self, "corpus_pairs", "must be >= 0")


def make_preference_files(model, corpus: Tensor, out, config: PreferenceTaskConfig) -> dict:
    """The demo task's data: train.jsonl / val.jsonl preference pairs labelled by the (noisy) gold judge,
    demos.jsonl for SFT and stats.json, in folder `out`."""
    c, out, judge = config, Path(out), load_judge(config.judge)
    pairs, stats = build_preferences(model, corpus, pairs=c.pairs + c.val_pairs, prompt_len=c.prompt_len,
                                     response_len=c.response_len, flip=c.flip, min_gap=c.min_gap,
                                     batch=c.batch_size, seed=c.seed, quiet=c.quiet, judge=judge,
                                     per_prompt=c.per_prompt)
    train = pairs[:c.pairs]
    if c.corpus_pairs:  # the sampled pairs alone too: on-policy data for DPO, which real text would pull off-policy
        write_jsonl(train, out / "train_sampled.jsonl")
        train += corpus_preferences(corpus, pairs=c.corpus_pairs, judge=judge, prompt_len=c.prompt_len,
                                    response_len=c.response_len, min_gap=c.min_gap, seed=c.seed)
        random.Random(c.seed).shuffle(train)
    write_jsonl(train, out / "train.jsonl")
    write_jsonl(pairs[c.pairs:], out / "val.jsonl")
    demos = build_demonstrations(corpus, count=c.demos, prompt_len=c.prompt_len, response_len=c.response_len,
                                 seed=c.seed, judge=judge)
    write_jsonl(demos, out / "demos.jsonl")
    stats.update(train=len(train), val=c.val_pairs, demos=len(demos), config=asdict(c))
    atomic_write_text(json.dumps(stats, indent=1), out / "stats.json")
    print(f"wrote {len(train)} training and {c.val_pairs} held-out pairs, {len(demos)} demonstrations to {out}; "
          f"{stats['ties_skipped']} ties skipped, {stats['labels_flipped']} labels flipped ({stats['flip_rate']:.1%})")
    return stats
