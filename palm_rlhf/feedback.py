"""Human-feedback data: demonstrations (SFT) and preferences (reward model), from JSONL files.

Formats, one JSON object per line:
    demonstrations   {"prompt": str, "response": str}
    pairs            {"prompt": str, "chosen": str, "rejected": str}       (TRL / Hugging Face style)
    ranked lists     {"prompt": str, "responses": [str, ...]}              best first; becomes all pairs
    ratings          {"prompt": str, "response": str, "rating": number}    for bin / regression reward models
    scored           {"prompt": str, "response": str, "reward": number}    offline RL (ILQL); "rating" reads too
    prompts          {"prompt": str}                                        for PPO

Text becomes tokens through `tokenizer` (default: UTF-8 bytes, 256 tokens, the same as enwik8 pretraining).
Bad lines stop loading with the file name and line number: nothing half-loaded is ever used.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor


def byte_tokenizer(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def _read_jsonl(path) -> list[tuple[int, dict]]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg})") from err
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            rows.append((lineno, row))
    if not rows:
        raise ValueError(f"{path} holds no examples")
    return rows


def _text(row: dict, key: str, where: str) -> str:
    if key not in row:
        raise ValueError(f"{where}: missing field {key!r} (fields present: {sorted(row)})")
    value = row[key]
    if not isinstance(value, str):
        raise ValueError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    if not value:
        raise ValueError(f"{where}: field {key!r} is empty")
    return value


def load_demonstrations(path) -> list[dict]:
    """[{"prompt", "response"}]"""
    return [{"prompt": _text(r, "prompt", f"{path}:{n}"), "response": _text(r, "response", f"{path}:{n}")}
            for n, r in _read_jsonl(path)]


def load_preferences(path) -> list[dict]:
    """Pairs [{"prompt", "chosen", "rejected"}], from pair lines and ranked-list lines (all pairs, best first)."""
    pairs = []
    for n, r in _read_jsonl(path):
        where = f"{path}:{n}"
        prompt = _text(r, "prompt", where)
        if "responses" in r:
            responses = r["responses"]
            if not isinstance(responses, list) or len(responses) < 2:
                raise ValueError(f"{where}: 'responses' must be a list of at least 2 strings, best first")
            ranked = [_text({"r": x}, "r", f"{where} responses[{i}]") for i, x in enumerate(responses)]
            pairs += [{"prompt": prompt, "chosen": a, "rejected": b} for a, b in combinations(ranked, 2)]
        else:
            pairs.append({"prompt": prompt, "chosen": _text(r, "chosen", where),
                          "rejected": _text(r, "rejected", where)})
    return pairs


def load_prompts_file(path) -> list[str]:
    """Prompts for PPO: JSONL lines {"prompt": str}."""
    return [_text(r, "prompt", f"{path}:{n}") for n, r in _read_jsonl(path)]


def load_ratings(path, keys: tuple[str, ...] = ("rating",)) -> list[dict]:
    """[{"prompt", "response", "rating"}] with numeric ratings (read from the first of `keys` a row has)."""
    out = []
    for n, r in _read_jsonl(path):
        where = f"{path}:{n}"
        key = next((k for k in keys if k in r), keys[0])
        rating = r.get(key)
        if isinstance(rating, bool) or not isinstance(rating, (int, float)) or rating != rating:
            raise ValueError(f"{where}: field {key!r} must be a number, got {rating!r}")
        out.append({"prompt": _text(r, "prompt", where), "response": _text(r, "response", where),
                    "rating": float(rating)})
    return out


def load_scored(path) -> list[dict]:
    """Offline RL data (ILQL): rows {"prompt", "response", "reward"} (or "rating"), as load_ratings returns them."""
    return load_ratings(path, keys=("reward", "rating"))


@dataclass
class Encoded:
    """One prompt + response as token ids (and its rating, for rating data)."""
    prompt: list[int]
    response: list[int]
    rating: float | None = None


def encode(prompt: str, response: str, max_len: int, tokenizer: Callable[[str], list[int]] = byte_tokenizer,
           eos_token: int | None = None) -> Encoded | None:
    """Tokenize; keep the prompt whole and cut the response to fit `max_len`. None if nothing of it would fit."""
    p, r = tokenizer(prompt), tokenizer(response)
    if eos_token is not None:
        r = r + [eos_token]
    room = max_len - len(p)
    if room < 1:
        return None
    return Encoded(p, r[:room])


def encode_all(examples: list[dict], keys: tuple[str, ...], max_len: int, tokenizer=byte_tokenizer,
               eos_token: int | None = None) -> tuple[list[list[Encoded]], int]:
    """Encode (prompt, example[key]) for each key; examples where any part cannot fit are dropped and counted."""
    kept, dropped = [], 0
    for ex in examples:
        enc = [encode(ex["prompt"], ex[k], max_len, tokenizer, eos_token) for k in keys]
        if any(e is None for e in enc):
            dropped += 1
            continue
        for e in enc:
            e.rating = ex.get("rating", ex.get("reward"))
        kept.append(enc)
    return kept, dropped


def collate(items: list[Encoded], pad_token: int = 0) -> dict[str, Tensor]:
    """Right-padded batch: tokens, mask (real tokens), response_mask (response tokens only)."""
    n = max(len(e.prompt) + len(e.response) for e in items)
    tokens = torch.full((len(items), n), pad_token, dtype=torch.long)
    mask = torch.zeros((len(items), n), dtype=torch.bool)
    response_mask = torch.zeros((len(items), n), dtype=torch.bool)
    for i, e in enumerate(items):
        p, r = len(e.prompt), len(e.response)
        tokens[i, :p + r] = torch.tensor(e.prompt + e.response)
        mask[i, :p + r] = True
        response_mask[i, p:p + r] = True
    return {"tokens": tokens, "mask": mask, "response_mask": response_mask}


def as_examples(data, loader: Callable) -> list[dict]:
    """Examples given as a list of dicts, or as the path of a JSONL file that `loader` reads."""
    return loader(data) if isinstance(data, (str, Path)) else list(data)


def load_examples(train, val, loader: Callable, keys: tuple[str, ...], max_len: int, val_fraction: float):
    """What SFT and reward modelling take in: (held-out examples, encoded training set, encoded held-out set) from
    lists of dicts or JSONL paths; without `val`, the last `val_fraction` of `train` is held out."""
    held_out = as_examples(val, loader) if val is not None else None
    train_ex, val_ex = split_examples(as_examples(train, loader), held_out, val_fraction)
    return (val_ex, encode_or_fail(train_ex, keys, max_len, "training"),
            encode_or_fail(val_ex, keys, max_len, "held-out"))


def split_examples(train: list, val: list | None = None, val_fraction: float = 0.1) -> tuple[list, list]:
    """(train, held-out): `val` when given, else the last `val_fraction` of `train`."""
    if val is not None:
        return train, val
    n_val = max(1, int(len(train) * val_fraction))
    if n_val >= len(train):
        raise ValueError(f"{len(train)} examples are too few to hold out {n_val} for evaluation; give more, or a "
                         f"separate held-out set (--val)")
    return train[:-n_val], train[-n_val:]


def encode_or_fail(examples: list[dict], keys: tuple[str, ...], max_len: int, what: str) -> list[list[Encoded]]:
    """encode_all, refusing a set where nothing fits and saying how many examples were dropped."""
    encoded, dropped = encode_all(examples, keys, max_len)
    if not encoded:
        raise ValueError(f"every {what} example is longer than max_len {max_len} in its prompt alone; raise "
                         f"--max-len or shorten the prompts")
    if dropped:
        print(f"{what}: dropped {dropped} of {len(examples)} examples whose prompt alone reaches max_len {max_len}")
    return encoded


def held_out_prompts(encoded: list[list[Encoded]], n: int) -> list[Tensor]:
    """The distinct prompts of an encoded held-out set (sorted, at most n): what a trainer samples at evaluation."""
    return [torch.tensor(p) for p in sorted({tuple(e[0].prompt) for e in encoded})][:n]


def chunks(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]

