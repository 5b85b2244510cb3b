"""Byte-level corpora: reading raw / gzip / zip files, the named datasets enwik8 and enwik6, random training
windows, and prompts (windows of a corpus, or a list) for RL stages."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor
from tqdm import tqdm

from .utils import atomic_write

ENWIK8_URL = "http://mattmahoney.net/dc/enwik8.zip"
ENWIK8_SHA256 = "2b49720ec4d78c3c9fabaee6e4179a5e997302b3a70029f30f2d582218c024a8"  # the 100,000,000 raw bytes
ENWIK8_BYTES = 100_000_000
ENWIK6_SHA256 = "369b688978f649681136198fb96db14c1616756260c55fb4b65e9bc049552cad"  # its first 1,000,000 bytes
ENWIK6_BYTES = 1_000_000
DATASETS = ("enwik8", "enwik6")


def read_bytes(path: str | os.PathLike) -> bytes:
    """The raw bytes of a file, transparently un-gzipping (.gz) or unzipping a single-member .zip."""
    path = Path(path)
    if path.is_dir():
        raise FileNotFoundError(f"data file {path} is a directory; pass a text file (raw, .gz or .zip) or a dataset "
                                f"name ({', '.join(DATASETS)})")
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist; pass a text file (raw, .gz or .zip) or a dataset "
                                f"name ({', '.join(DATASETS)})")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic[:2] == b"\x1f\x8b":
        try:
            with gzip.open(path, "rb") as f:
                return f.read()
        except (OSError, EOFError) as err:
            raise RuntimeError(f"{path} looks gzip-compressed but is corrupt or truncated ({err})") from err
    if magic == b"PK\x03\x04":
        with zipfile.ZipFile(path) as z:
            names = [n for n in z.namelist() if not n.endswith("/")]
            if len(names) != 1:
                raise ValueError(f"{path} holds {len(names)} files; give a zip with exactly one, or unzip it first")
            return z.read(names[0])
    return path.read_bytes()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def download_enwik8(dest: str | os.PathLike = "data/enwik8.gz", url: str = ENWIK8_URL,
                    expected_sha256: str | None = None) -> Path:
    """Fetch enwik8.zip, check the sha256 of its 100 MB of raw bytes, store it gzip-compressed at `dest`.

    Written atomically: an interrupted or failed download leaves nothing at `dest`.
    """
    dest = Path(dest)
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            buf = io.BytesIO()
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {url}") as bar:
                while chunk := response.read(1 << 20):
                    buf.write(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, OSError) as err:
        raise RuntimeError(
            f"could not download enwik8 from {url} ({err}). Without internet, fetch enwik8.zip elsewhere and put it "
            f"at {dest} (gzip, zip or raw all work), or train on any file with `--data PATH`."
        ) from err
    expected_sha256 = expected_sha256 or ENWIK8_SHA256
    payload = buf.getvalue()
    if payload[:4] == b"PK\x03\x04":
        with zipfile.ZipFile(io.BytesIO(payload)) as z:
            payload = z.read(z.namelist()[0])
    digest = sha256(payload)
    if digest != expected_sha256:
        raise RuntimeError(f"enwik8 from {url} has sha256 {digest}, expected {expected_sha256}: the download is "
                           f"corrupt or not enwik8. Nothing was written; try again or supply the file yourself.")
    atomic_write(dest, lambda f: f.write(gzip.compress(payload)))
    return dest


def dataset_file(name: str, data_dir: str | os.PathLike = "data", url: str = ENWIK8_URL) -> Path:
    """The file of a named dataset, made on first use and checked against its sha256:
    "enwik8" (the Hutter Prize's 100 MB, downloaded to DATA_DIR/enwik8.gz) or "enwik6" (its first 1 MB, cut from
    enwik8 and cached as DATA_DIR/enwik6.gz: the real text this project's tests, demos and README results use)."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}, or pass a file path")
    path = Path(data_dir) / f"{name}.gz"
    if path.is_file():
        if name == "enwik6" and sha256(read_bytes(path)) != ENWIK6_SHA256:  # 1 MB: cheap to check at every use
            raise RuntimeError(f"{path} is not enwik6 (its sha256 is not {ENWIK6_SHA256}); delete it and it is made "
                               f"again from enwik8")
        return path
    if name == "enwik8":
        return download_enwik8(path, url=url)
    cut = read_bytes(dataset_file("enwik8", data_dir, url))[:ENWIK6_BYTES]
    if sha256(cut) != ENWIK6_SHA256:
        raise RuntimeError(f"the first {ENWIK6_BYTES:,} bytes of {Path(data_dir) / 'enwik8.gz'} have sha256 "
                           f"{sha256(cut)}, expected {ENWIK6_SHA256}: that file is not enwik8. Delete it to download "
                           f"it again. Nothing was written.")
    atomic_write(path, lambda f: f.write(gzip.compress(cut)))
    return path


def load_corpus(source: str | os.PathLike | None = None, data_dir: str | os.PathLike = "data",
                url: str = ENWIK8_URL) -> Tensor:
    """A uint8 tensor of a corpus's bytes. `source`: a file (raw, .gz, single-file .zip), or a dataset name,
    "enwik8" (the default) or "enwik6", fetched into `data_dir` on first use (see dataset_file)."""
    source = "enwik8" if source is None else source
    if str(source) in DATASETS and not Path(source).is_file():
        source = dataset_file(str(source), data_dir, url)
    data = read_bytes(source)
    if len(data) < 2:
        raise ValueError(f"{source} holds {len(data)} bytes; a corpus needs at least 2")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def split_corpus(data: Tensor, val_fraction: float = 0.05) -> tuple[Tensor, Tensor]:
    """Split at the end: enwik8's customary split is the first 90M bytes for training, the last 5M for testing."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction}")
    n_val = max(int(len(data) * val_fraction), 2)
    return data[:-n_val], data[-n_val:]


def random_windows(data: Tensor, batch_size: int, seq_len: int, generator: torch.Generator) -> Tensor:
    """`batch_size` random windows of `seq_len + 1` bytes (inputs and next-byte targets), as long (b, seq_len + 1)."""
    if len(data) <= seq_len + 1:
        raise ValueError(f"corpus of {len(data)} bytes is too short for windows of {seq_len + 1}; lower --seq-len")
    starts = torch.randint(0, len(data) - seq_len - 1, (batch_size,), generator=generator)
    return torch.stack([data[s:s + seq_len + 1] for s in starts.tolist()]).long()


def decode_bytes(tokens) -> str:
    """Token ids (bytes) -> printable text (undecodable bytes replaced)."""
    return bytes(int(t) for t in tokens).decode("utf-8", errors="replace")


def encode_text(text: str) -> Tensor:
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def prompt_windows(corpus: Tensor, n: int, length: int, seed: int) -> list[Tensor]:
    """n windows of `length` bytes at random places in the corpus, a function of `seed` alone."""
    if len(corpus) <= length:
        raise ValueError(f"corpus of {len(corpus)} bytes is too short for prompts of {length}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(corpus) - length, (n,), generator=g).tolist()
    return [corpus[s:s + length].long() for s in starts]


def draw(items: list, n: int, generator: torch.Generator) -> list:
    """n items drawn with replacement (a seeded generator makes the draw repeatable, e.g. across a resume)."""
    return [items[i] for i in torch.randint(len(items), (n,), generator=generator).tolist()]


PromptSampler = Callable[[int, int], list]  # (count, seed) -> count prompts (1-D token tensors)


def prompt_sampler(source, length: int | None = None) -> PromptSampler:
    """Prompts for RL as a function of (count, seed) alone, so runs resume and compare exactly. `source`: a corpus
    tensor (windows of `length` bytes), a list of strings or 1-D token tensors (drawn with replacement), or such a
    function already."""
    if callable(source):
        return source
    if isinstance(source, Tensor):
        if length is None:
            raise ValueError("prompts from a corpus need a window length")
        return lambda count, seed: prompt_windows(source, count, length, seed)
    rows = [encode_text(p) if isinstance(p, str) else p for p in source]
    if not rows:
        raise ValueError("no prompts given")
    return lambda count, seed: draw(rows, count, torch.Generator().manual_seed(seed))
