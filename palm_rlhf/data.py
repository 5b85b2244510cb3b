"""Byte-level corpora: reading raw / gzip / zip files, fetching enwik8, and random training windows."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

ENWIK8_URL = "http://mattmahoney.net/dc/enwik8.zip"
ENWIK8_SHA256 = "2b49720ec4d78c3c9fabaee6e4179a5e997302b3a70029f30f2d582218c024a8"  # the 100,000,000 raw bytes
ENWIK8_BYTES = 100_000_000


def read_bytes(path: str | os.PathLike) -> bytes:
    """The raw bytes of a file, transparently un-gzipping (.gz) or unzipping a single-member .zip."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
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
                    expected_sha256: str = ENWIK8_SHA256) -> Path:
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
    payload = buf.getvalue()
    if payload[:4] == b"PK\x03\x04":
        with zipfile.ZipFile(io.BytesIO(payload)) as z:
            payload = z.read(z.namelist()[0])
    digest = sha256(payload)
    if digest != expected_sha256:
        raise RuntimeError(f"enwik8 from {url} has sha256 {digest}, expected {expected_sha256}: the download is "
                           f"corrupt or not enwik8. Nothing was written; try again or supply the file yourself.")
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb") as f:
            f.write(payload)
        os.replace(tmp, dest)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return dest


def load_corpus(path: str | os.PathLike | None = None, download_to: str = "data/enwik8.gz") -> Tensor:
    """A uint8 tensor of the corpus bytes. With no path, enwik8 (downloaded to `download_to` if missing)."""
    if path is None:
        if not Path(download_to).is_file():
            download_enwik8(download_to)
        path = download_to
    data = read_bytes(path)
    if len(data) < 2:
        raise ValueError(f"{path} holds {len(data)} bytes; a corpus needs at least 2")
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
