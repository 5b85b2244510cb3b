"""JSONL loaders (errors with file and line), truncation, batching, SFT loss masking."""

import json

import pytest
import torch

from palm_rlhf import PaLM, PaLMConfig, next_token_loss
from palm_rlhf.feedback import (collate, encode, encode_all, load_demonstrations, load_preferences, load_ratings)


def write(tmp_path, name, lines):
    path = tmp_path / name
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def test_good_files(tmp_path):
    demos = load_demonstrations(write(tmp_path, "d.jsonl", [{"prompt": "Q", "response": "A", "extra": 1}, ""]))
    assert demos == [{"prompt": "Q", "response": "A"}]
    prefs = load_preferences(write(tmp_path, "p.jsonl", [
        {"prompt": "p", "chosen": "good", "rejected": "bad"},
        {"prompt": "q", "responses": ["best", "mid", "worst"]}]))
    assert len(prefs) == 1 + 3
    assert {"prompt": "q", "chosen": "best", "rejected": "worst"} in prefs
    assert {"prompt": "q", "chosen": "mid", "rejected": "best"} not in prefs
    ratings = load_ratings(write(tmp_path, "r.jsonl", [{"prompt": "p", "response": "r", "rating": 3}]))
    assert ratings[0]["rating"] == 3.0


@pytest.mark.parametrize("line,match", [
    ("{not json", r"bad.jsonl:2: not valid JSON"),
    (json.dumps(["a", "list"]), r"bad.jsonl:2: expected a JSON object"),
    (json.dumps({"prompt": "p", "chosen": "c"}), r"bad.jsonl:2: missing field 'rejected'"),
    (json.dumps({"prompt": "p", "chosen": 3, "rejected": "r"}), r"bad.jsonl:2: field 'chosen' must be a string"),
    (json.dumps({"prompt": "", "chosen": "c", "rejected": "r"}), r"bad.jsonl:2: field 'prompt' is empty"),
    (json.dumps({"prompt": "p", "responses": ["only one"]}), r"bad.jsonl:2: 'responses' must be a list of at least 2"),
])
def test_bad_preference_lines_name_file_and_line(tmp_path, line, match):
    path = write(tmp_path, "bad.jsonl", [{"prompt": "p", "chosen": "c", "rejected": "r"}, line])
    with pytest.raises(ValueError, match=match):
        load_preferences(path)


def test_bad_ratings_and_missing_or_empty_files(tmp_path):
    with pytest.raises(ValueError, match=r"r.jsonl:1: field 'rating' must be a number"):
        load_ratings(write(tmp_path, "r.jsonl", [{"prompt": "p", "response": "r", "rating": "high"}]))
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_demonstrations(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match="holds no examples"):
        load_demonstrations(write(tmp_path, "empty.jsonl", [""]))


def test_truncation_keeps_prompt_and_counts_drops():
    e = encode("abc", "defghij", max_len=6)
    assert e.prompt == list(b"abc") and e.response == list(b"def")
    assert encode("abcdef", "x", max_len=6) is None
    kept, dropped = encode_all([{"prompt": "ab", "response": "c"}, {"prompt": "a" * 10, "response": "c"}],
                               ("response",), max_len=8)
    assert len(kept) == 1 and dropped == 1
    custom = encode("ab", "cd", max_len=10, tokenizer=lambda s: [ord(ch) - 90 for ch in s], eos_token=1)
    assert custom.response == [9, 10, 1]


def test_collate_masks():
    batch = collate([encode("ab", "cde", 10), encode("a", "b", 10)])
    assert batch["tokens"].shape == (2, 5)
    assert batch["mask"].tolist() == [[True] * 5, [True, True, False, False, False]]
    assert batch["response_mask"].tolist() == [[False, False, True, True, True], [False, True, False, False, False]]


def test_prompt_tokens_contribute_nothing_to_the_sft_loss():
    torch.manual_seed(0)
    model = PaLM(PaLMConfig.preset("test"))
    b = collate([encode("prompt one", "resp", 64), encode("p2", "a longer response", 64)])
    logits = model(b["tokens"][:, :-1], mask=b["mask"][:, :-1])
    loss = next_token_loss(logits, b["tokens"][:, 1:], b["response_mask"][:, 1:])
    prompt_targets = (~b["response_mask"][:, 1:])
    grad = torch.autograd.grad(loss, logits)[0]
    assert grad[prompt_targets].abs().max() == 0 and grad[~prompt_targets].abs().max() > 0
    changed = b["tokens"].clone()
    changed[0, 3] = (changed[0, 3] + 1) % 256  # a prompt token that is only ever a *target* of the masked loss...
    only_target = next_token_loss(logits, changed[:, 1:], b["response_mask"][:, 1:])
    assert only_target.item() == pytest.approx(loss.item())
