"""Byte corpora: raw / gzip / zip, splits and windows, enwik8 download against a local fake."""

import gzip
import zipfile

import pytest
import torch

from palm_rlhf.data import (download_enwik8, load_corpus, random_windows, read_bytes, sha256, split_corpus)


def test_raw_gz_and_zip_read_the_same_bytes(tmp_path):
    payload = bytes(range(256)) * 10
    (tmp_path / "a.txt").write_bytes(payload)
    with gzip.open(tmp_path / "a.gz", "wb") as f:
        f.write(payload)
    with zipfile.ZipFile(tmp_path / "a.zip", "w") as z:
        z.writestr("inner", payload)
    for name in ("a.txt", "a.gz", "a.zip"):
        assert read_bytes(tmp_path / name) == payload
    corpus = load_corpus(tmp_path / "a.gz")
    assert corpus.dtype == torch.uint8 and corpus.tolist() == list(payload)


def test_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        read_bytes(tmp_path / "nope.txt")
    (tmp_path / "bad.gz").write_bytes(b"\x1f\x8b" + b"garbage" * 10)
    with pytest.raises(RuntimeError, match="bad.gz looks gzip-compressed but is corrupt"):
        read_bytes(tmp_path / "bad.gz")


def test_split_and_windows():
    data = torch.arange(1000) % 256
    train, val = split_corpus(data.to(torch.uint8), 0.1)
    assert len(train) == 900 and len(val) == 100
    x = random_windows(train, 4, 16, torch.Generator().manual_seed(0))
    assert x.shape == (4, 17) and x.dtype == torch.long
    assert ((x[:, 1:] - x[:, :-1]) % 256 == 1).all()  # contiguous windows of the corpus
    with pytest.raises(ValueError, match="too short"):
        random_windows(val, 2, 200, torch.Generator())


def test_real_text_loads(text_file):
    corpus = load_corpus(text_file)
    assert len(corpus) > 10_000


def fake_zip(tmp_path, payload):
    path = tmp_path / "enwik8.zip"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("enwik8", payload)
    return path


def test_download_verifies_checksum_and_writes_gzip(tmp_path):
    payload = b"<mediawiki> fake enwik8 " * 100
    src = fake_zip(tmp_path, payload)
    dest = download_enwik8(tmp_path / "data" / "enwik8.gz", url=src.as_uri(), expected_sha256=sha256(payload))
    assert read_bytes(dest) == payload
    assert load_corpus(None, download_to=str(dest)).tolist() == list(payload)  # present: no download


def test_download_with_wrong_checksum_writes_nothing(tmp_path):
    src = fake_zip(tmp_path, b"not enwik8")
    dest = tmp_path / "data" / "enwik8.gz"
    with pytest.raises(RuntimeError, match="expected 2b49720e"):
        download_enwik8(dest, url=src.as_uri())
    assert not (tmp_path / "data").exists()  # checked before anything is written


def test_offline_download_says_how_to_supply_the_file(tmp_path):
    with pytest.raises(RuntimeError, match="--data PATH"):
        download_enwik8(tmp_path / "enwik8.gz", url="http://127.0.0.1:9/enwik8.zip")
