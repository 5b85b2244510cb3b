"""Small helpers shared by every module (defined once, imported everywhere)."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import torch
from torch import Tensor


def exists(value) -> bool:
    return value is not None


def masked_mean(x: Tensor, mask: Tensor | None = None, dim=None) -> Tensor:
    """Mean of `x` over entries where `mask` is True (all entries if mask is None)."""
    if not exists(mask):
        return x.mean() if dim is None else x.mean(dim=dim)
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1.0)
    return (x * mask).sum(dim=dim) / mask.sum(dim=dim).clamp(min=1.0)


def masked_var(x: Tensor, mask: Tensor | None = None) -> Tensor:
    """Unbiased variance of the entries of `x` where `mask` is True."""
    if not exists(mask):
        return x.var()
    mean = masked_mean(x, mask)
    n = mask.sum().clamp(min=2).to(x.dtype)
    return (((x - mean) ** 2) * mask).sum() / (n - 1)


def masked_whiten(x: Tensor, mask: Tensor | None = None, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Normalise `x` to zero mean and unit variance using only masked entries; masked-out entries become 0."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened if not exists(mask) else whitened * mask


def bits_per_char(loss_nats: float) -> float:
    return loss_nats / math.log(2)


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over `path`.

    A crash or Ctrl-C at any point leaves either the old file or the new one, never a torn one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def safe_torch_load(path: str | os.PathLike, map_location="cpu"):
    """Load a checkpoint without executing pickled code; corrupt or foreign files get a clear error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist; pass the path of a .pt file written by train.py")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises several types for truncated zips / unpickling refusals
        raise RuntimeError(
            f"could not load checkpoint {path}: it is truncated, corrupt, or holds objects other than tensors and "
            f"plain Python values ({type(err).__name__}: {err}). Use a checkpoint written by train.py, or delete it "
            f"and start again."
        ) from err


def write_jsonl(rows: list[dict], path: str | os.PathLike) -> None:
    """One JSON object per line, written to a temporary file beside `path` and renamed over it (never torn)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)
