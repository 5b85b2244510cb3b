"""Judges (text -> score): by name, as module:function, as a PPO reward function; the sentiment task's data."""

import json

import pytest
import torch

from palm_rlhf import PaLM, PaLMConfig, cli
from palm_rlhf.judges import (COMMON_SENTIMENT_WORDS, JUDGES, judge_reward, load_judge, prose, sentiment,
                               sentiment_common)
from palm_rlhf.feedback import collate, encode


def test_judges_by_name_and_by_module_function(tmp_path, monkeypatch):
    assert load_judge("prose") is prose and set(JUDGES) == {"prose", "sentiment", "sentiment-common"}
    (tmp_path / "my_judges.py").write_text("def shouting(text):\n    return sum(c.isupper() for c in text)\n"
                                           "NOT_CALLABLE = 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_judge("my_judges:shouting")("ABc") == 2
    for spec, why in (("nope", "module:function"), ("no_such_module_x:f", "cannot import"),
                      ("my_judges:missing", "no attribute"), ("my_judges:NOT_CALLABLE", "not callable")):
        with pytest.raises(ValueError, match=why):
            load_judge(spec)


def test_sentiment_is_vader_compound():
    pytest.importorskip("vaderSentiment")
    assert sentiment("What a wonderful, happy day. I love it!") > 0.8
    assert sentiment("a terrible, sad and horrible war") < -0.8
    assert sentiment("the table has four legs") == 0.0
    # the common-words variant: VADER's rules on 100 frequent words only; rarer words count for nothing
    assert len(COMMON_SENTIMENT_WORDS) == 100 and {"good", "great", "war", "no"} <= set(COMMON_SENTIMENT_WORDS)
    assert sentiment_common("a great and good friend") == sentiment("a great and good friend") > 0.5
    assert sentiment_common("not good") == sentiment("not good") < 0        # negation still applies
    assert sentiment_common("a superb, delightful day") == 0.0 < sentiment("a superb, delightful day")


def test_a_judge_as_reward_function_scores_the_response_only():
    fn = judge_reward(lambda text: float(len(text)))
    b = collate([encode("prompt that is long", "abc", 64), encode("p", "abcdefg", 64)])
    scores = fn(b["tokens"], b["mask"], b["response_mask"])
    assert scores.tolist() == [3.0, 7.0]


def test_ppo_on_a_reward_function(tmp_path):
    torch.manual_seed(0)
    PaLM(PaLMConfig.preset("test")).save(tmp_path / "base")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": f"q{i}:"}) for i in range(8)))
    args = ["ppo", "--init", str(tmp_path / "base"), "--prompts", str(prompts), "--prompts-per-iter", "4",
            "--minibatch-size", "2", "--max-new-tokens", "8", "--ppo-epochs", "1", "--eval-prompts", "4",
            "--best-of", "2", "--steps", "2", "--checkpoint-dir", str(tmp_path / "ppo"), "--quiet"]
    summary = cli.main([*args, "--reward-fn", "prose", "--gold", "prose"])
    after = summary["results"]["trained policy (after)"]
    assert after["rm_score"] == pytest.approx(after["gold_score"])  # the reward is the judge itself
    with pytest.raises(cli.CLIError, match="give one reward"):
        cli.main(args)
    with pytest.raises(cli.CLIError, match="give one reward"):
        cli.main([*args, "--reward-fn", "prose", "--reward", str(tmp_path / "base")])
