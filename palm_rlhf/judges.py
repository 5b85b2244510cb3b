"""Judges: functions from a response's text to a score. They label the checkable tasks' preferences, stand in for
humans when a run is evaluated ("gold" scores), and can replace a reward model outright (`--reward-fn`).

- `prose`: "prefers clean prose", the share of letters and spaces in the response minus 0.05 for every piece of
  wiki markup ([[ ]] {{ }} | = * # < > and the entities &lt; &gt; &amp; &quot;).
- `sentiment`: VADER's compound score in [-1, 1] (Hutto & Gilbert 2014, the rule-based sentiment analyser of the
  `vaderSentiment` package, an optional extra: `pip install -e ".[sentiment]"`). Continuing a prompt with positive
  sentiment is the field's standard testbed for comparing RLHF methods (the DPO paper's, TRL's and trlX's).
- `sentiment-common`: the same VADER scorer with its lexicon cut to the 100 alphabetic lexicon words most frequent
  in enwik6 (`COMMON_SENTIMENT_WORDS`, counted with VADER's own tokenizer; each occurs >= 12 times there). A reward
  model only learns what a word is worth from pairs where the word occurs, and full VADER's verdicts on samples
  of a small byte-level model hinge on words too rare for that (README, the sentiment task, has the numbers).
- Any function of your own, named `module:function` (a file's folder must be importable, e.g. on PYTHONPATH).
"""

from __future__ import annotations

import importlib
from functools import lru_cache
from typing import Callable

import torch
from torch import Tensor

from .data import decode_bytes

Judge = Callable[[str], float]                           # a response's text -> a score
RewardFn = Callable[[Tensor, Tensor, Tensor], Tensor]   # (tokens, mask, response_mask), each (b, n) -> (b,) scores

COMMON_SENTIMENT_WORDS = (
    "united", "war", "no", "award", "best", "well", "like", "great", "number", "natural", "party", "important", "god",
    "popular", "slavery", "won", "novel", "free", "lost", "support", "certain", "help", "increase", "values",
    "battle", "good", "created", "awards", "disorder", "original", "death", "play", "lack", "ethical", "significant",
    "interest", "ability", "strong", "better", "killed", "supported", "increased", "interests", "true", "lower",
    "authority", "chance", "greatest", "limited", "argued", "value", "intellectual", "growth", "grand", "success",
    "save", "argue", "active", "accepted", "conflict", "prominent", "evil", "reached", "successful", "kind",
    "problems", "low", "friends", "matter", "hero", "love", "grant", "died", "benefit", "violence", "allow",
    "rebellion", "desire", "truth", "greater", "win", "special", "join", "capable", "rejected", "controversial",
    "benefits", "slam", "destroy", "wealth", "strongly", "critics", "difficult", "importance", "critical", "hand",
    "friend", "clear", "fire", "determined",
)

MARKUP = ("[[", "]]", "{{", "}}", "&lt;", "&gt;", "&amp;", "&quot;", "|", "=", "*", "#", "<", ">")


def prose(text: str) -> float:
    """Clean-prose score of a response: share of letters and spaces minus 0.05 per markup token."""
    if not text:
        return 0.0
    clean = sum(ch.isalpha() or ch == " " for ch in text) / len(text)
    return clean - 0.05 * sum(text.count(m) for m in MARKUP)


@lru_cache(maxsize=2)
def _vader(common_words_only: bool = False):
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError:
        raise ImportError("the sentiment judges need the vaderSentiment package: pip install -e \".[sentiment]\" "
                          "(or pip install vaderSentiment==3.3.2)") from None
    analyser = SentimentIntensityAnalyzer()
    if common_words_only:
        analyser.lexicon = {w: analyser.lexicon[w] for w in COMMON_SENTIMENT_WORDS}
    return analyser


def sentiment(text: str) -> float:
    """VADER compound sentiment of a response, in [-1, 1] (0: no sentiment words)."""
    return float(_vader().polarity_scores(text)["compound"])


def sentiment_common(text: str) -> float:
    """VADER compound sentiment counting only COMMON_SENTIMENT_WORDS (VADER's rules, e.g. negation, unchanged)."""
    return float(_vader(True).polarity_scores(text)["compound"])


JUDGES: dict[str, Judge] = {"prose": prose, "sentiment": sentiment, "sentiment-common": sentiment_common}


def load_judge(spec: str) -> Judge:
    """A judge by name (prose, sentiment) or as `module:function` (a callable str -> float)."""
    if spec in JUDGES:
        return JUDGES[spec]
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise ValueError(f"judge {spec!r}: name one of {sorted(JUDGES)} or give module:function")
    try:
        fn = getattr(importlib.import_module(module), name)
    except ModuleNotFoundError as err:
        raise ValueError(f"judge {spec!r}: cannot import {err.name!r} (is its folder on PYTHONPATH?)") from None
    except AttributeError:
        raise ValueError(f"judge {spec!r}: module {module!r} has no attribute {name!r}") from None
    if not callable(fn):
        raise ValueError(f"judge {spec!r}: {module}.{name} is not callable")
    return fn


def judge_texts(judge: Judge, tokens: Tensor, mask: Tensor) -> Tensor:
    """judge applied to the text (bytes) of each row's real tokens -> (b,) float tensor."""
    return torch.tensor([float(judge(decode_bytes(t[m].tolist()))) for t, m in zip(tokens.cpu(), mask.cpu())])


def judge_reward(judge: Judge) -> RewardFn:
    """A judge as a reward function: it scores the decoded response tokens of each row (the prompt is context)."""
    def reward_fn(tokens: Tensor, mask: Tensor, response_mask: Tensor) -> Tensor:
        return judge_texts(judge, tokens, mask & response_mask.bool()).to(tokens.device)
    reward_fn.judge = judge
    return reward_fn
