"""Small helpers shared by every module (defined once, imported everywhere)."""

from __future__ import annotations

import json
import math
import os
import pickle
import tempfile
from dataclasses import field
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor


def exists(value) -> bool:
    return value is not None


def option(default, help: str, **meta):
    """A dataclass field with its help text (and, optionally, `choices`), which the CLI shows."""
    return field(default=default, metadata={"help": help, **meta})


class ConfigError(ValueError):
    """A bad setting: names the field and the value, so the CLI can name the flag instead."""

    def __init__(self, owner: str, name: str, value, why: str):
        self.owner, self.name, self.value, self.why = owner, name, value, why
        super().__init__(f"{owner}.{name} = {value!r}: {why}")


def require(ok: bool, config, name: str, why: str) -> None:
    if not ok:
        raise ConfigError(type(config).__name__, name, getattr(config, name), why)


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


def atomic_write(path: str | os.PathLike, write: Callable) -> Path:
    """Call write(f) on a temporary binary file beside `path`, fsync, then rename it over `path`.

    A crash or Ctrl-C at any point leaves either the old file or the new one, never a torn one, and removes the
    temporary file (a killed process leaves it: `remove_stale_temp_files` cleans up on the next start).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def atomic_torch_save(obj, path: str | os.PathLike) -> Path:
    return atomic_write(path, lambda f: torch.save(obj, f))


def safe_torch_load(path: str | os.PathLike, map_location="cpu"):
    """Load a .pt file without executing pickled code; corrupt or foreign files get a clear error."""
    path = Path(path)
    if path.is_dir():
        raise FileNotFoundError(f"{path} is a directory; pass a checkpoint file (e.g. {path / 'last.pt'})")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist; pass the path of a file written by palm-rlhf")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if "Unsupported global" not in str(err):
            raise RuntimeError(f"could not load checkpoint {path}: it is corrupt or not a PyTorch file. Use a "
                               f"checkpoint written by palm-rlhf, or delete it and start again.") from None
        raise RuntimeError(  # torch's own text advises weights_only=False: never, for a file of unknown origin
            f"refused to load {path}: it holds objects other than tensors and plain Python values, and loading "
            f"them would run code from the file. palm-rlhf never does that; use a checkpoint written by palm-rlhf."
        ) from None
    except Exception as err:  # torch raises several types for truncated or foreign zips
        raise RuntimeError(
            f"could not load checkpoint {path}: it is truncated, corrupt, or not a PyTorch file "
            f"({type(err).__name__}). Use a checkpoint written by palm-rlhf, or delete it and start again."
        ) from None


def atomic_write_text(text: str, path: str | os.PathLike) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def remove_stale_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files (`.NAME.*tmp`) that a killed save left in `folder`; returns what was removed.
    Call it only where no other process is writing into the folder (the main process, before it saves)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = [p for p in folder.glob(".*tmp") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def write_jsonl(rows: list[dict], path: str | os.PathLike) -> None:
    """One JSON object per line, written through a temporary file and a rename (never torn)."""
    atomic_write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), path)
