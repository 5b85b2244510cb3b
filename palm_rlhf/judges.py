"""Judges: functions from a response's text to a score. They label the checkable tasks' preferences, stand in for
humans when a run is evaluated ("gold" scores), and can replace a reward model outright (`--reward-fn`).

- `prose`: "prefers clean prose", the share of letters and spaces in the response minus 0.05 for every piece of
  wiki markup ([[ ]] {{ }} | = * # < > and the entities &lt; &gt; &amp; &quot;).
- `sentiment`: VADER's compound score in [-1, 1] (Hutto & Gilbert 2014, the rule-based sentiment analyser of the
  `vaderSentiment` package, an optional extra: `pip install -e ".[sentiment]"`). Continuing a prompt with positive
  sentiment is the field's standard testbed for comparing RLHF methods (the DPO paper's, TRL's and trlX's).
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

MARKUP = ("[[", "]]", "{{", "}}", "&lt;", "&gt;", "&amp;", "&quot;", "|", "=", "*", "#", "<", ">")


def prose(text: str) -> float:
    """Clean-prose score of a response: share of letters and spaces minus 0.05 per markup token."""
    if not text:
        return 0.0
    clean = sum(ch.isalpha() or ch == " " for ch in text) / len(text)
    return clean - 0.05 * sum(text.count(m) for m in MARKUP)


@lru_cache(maxsize=1)
def _vader():
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError:
        raise ImportError("the sentiment judge needs the vaderSentiment package: pip install -e \".[sentiment]\" "
                          "(or pip install vaderSentiment==3.3.2)") from None
    return SentimentIntensityAnalyzer()


def sentiment(text: str) -> float:
    """VADER compound sentiment of a response, in [-1, 1] (0: no sentiment words)."""
    return float(_vader().polarity_scores(text)["compound"])


JUDGES: dict[str, Judge] = {"prose": prose, "sentiment": sentiment}


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
