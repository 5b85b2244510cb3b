"""Byte corpora: raw / gzip / zip, splits and windows, enwik8 download against a local fake."""

import gzip
import zipfile

import pytest
import torch

from palm_rlhf import data
from palm_rlhf.data import (download_enwik8, load_corpus, prompt_sampler, random_windows, read_bytes, sha256,
                            split_corpus)


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
    with pytest.raises(FileNotFoundError, match="nope.txt does not exist"):
        read_bytes(tmp_path / "nope.txt")
    with pytest.raises(FileNotFoundError, match="is a directory; pass a text file"):
        load_corpus(tmp_path)
    with pytest.raises(ValueError, match="unknown dataset 'enwik9'"):
        data.dataset_file("enwik9", tmp_path)
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
    assert load_corpus(None, data_dir=dest.parent).tolist() == list(payload)  # present: no download


def test_download_with_wrong_checksum_writes_nothing(tmp_path):
    src = fake_zip(tmp_path, b"not enwik8")
    dest = tmp_path / "data" / "enwik8.gz"
    with pytest.raises(RuntimeError, match="expected 2b49720e"):
        download_enwik8(dest, url=src.as_uri())
    assert not (tmp_path / "data").exists()  # checked before anything is written


def test_offline_download_says_how_to_supply_the_file(tmp_path):
    with pytest.raises(RuntimeError, match="--data PATH"):
        download_enwik8(tmp_path / "enwik8.gz", url="http://127.0.0.1:9/enwik8.zip")


def test_enwik6_by_name_is_cut_from_enwik8_checked_and_cached(tmp_path, monkeypatch):
    """`--data enwik6`: the first 1,000,000 bytes of the enwik8 our code downloads, checked against their sha256 and
    cached, so users get the exact text the README's results use. Here enwik8 is a local fake with its own digests."""
    payload = bytes(range(256)) * 5000                            # 1.28 MB stands in for the 100 MB
    monkeypatch.setattr(data, "ENWIK8_SHA256", sha256(payload))
    monkeypatch.setattr(data, "ENWIK6_SHA256", sha256(payload[:1_000_000]))
    url = fake_zip(tmp_path, payload).as_uri()
    corpus = load_corpus("enwik6", data_dir=tmp_path / "data", url=url)
    assert len(corpus) == 1_000_000 and bytes(corpus.tolist()) == payload[:1_000_000]
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["enwik6.gz", "enwik8.gz"]
    monkeypatch.setattr(data, "download_enwik8", None)           # cached now: no second download
    assert torch.equal(load_corpus("enwik6", data_dir=tmp_path / "data"), corpus)
    (tmp_path / "data" / "enwik6.gz").write_bytes(b"damaged")  # and the cache is checked at every use
    with pytest.raises(RuntimeError, match="enwik6.gz is not enwik6"):
        load_corpus("enwik6", data_dir=tmp_path / "data")


def test_enwik6_from_a_file_that_is_not_enwik8_writes_nothing(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "enwik8.gz").write_bytes(b"something else entirely" * 50_000)
    with pytest.raises(RuntimeError, match="that file is not enwik8"):
        load_corpus("enwik6", data_dir=tmp_path / "data")
    assert not (tmp_path / "data" / "enwik6.gz").exists()


def test_the_enwik6_digest_matches_the_real_file():
    from conftest import ENWIK6
    if not ENWIK6.is_file():
        pytest.skip("no ../shared/data/enwik6.gz beside the repo")
    assert sha256(read_bytes(ENWIK6)) == data.ENWIK6_SHA256


def test_prompt_sampler_is_a_function_of_the_seed():
    rows = prompt_sampler(["first prompt", "second"])
    a, b = rows(5, 1), rows(5, 1)
    assert [t.tolist() for t in a] == [t.tolist() for t in b]
    assert {bytes(t.tolist()) for t in a} <= {b"first prompt", b"second"}
    corpus = torch.arange(200, dtype=torch.uint8)
    windows = prompt_sampler(corpus, 8)(3, 0)
    assert all(len(w) == 8 and ((w[1:] - w[:-1]) == 1).all() for w in windows)
    with pytest.raises(ValueError, match="window length"):
        prompt_sampler(corpus)
