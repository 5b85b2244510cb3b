"""Test set-up. Kernel tests run under Triton's CPU interpreter unless PALM_TEST_DEVICE=cuda (then on the GPU).

TRITON_INTERPRET must be set before the module defining the @triton.jit kernels is imported, hence here.
"""

import os

DEVICE = os.environ.get("PALM_TEST_DEVICE", "cpu")
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("PALM_ATTN_BACKEND", "auto")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def device():
    return DEVICE


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: slower end-to-end tests (still run in CI)")
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped on CPU)")

from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ENWIK6 = ROOT.parent / "shared" / "data" / "enwik6.gz"


@pytest.fixture(scope="session")
def text_file(tmp_path_factory):
    """A real-text corpus: enwik6 when it is beside the repo, else a generated English-like file (a fresh clone)."""
    if ENWIK6.is_file():
        return ENWIK6
    # a little markup among them, so that the clean-prose judge tells windows apart
    words = ("the of and to in is was for on that with as by at from his her an which are this be "
             "[[city]] {{ref}} 1905 |").split()
    gen = torch.Generator().manual_seed(0)
    idx = torch.randint(0, len(words), (40000,), generator=gen).tolist()
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(" ".join(words[i] for i in idx))
    return path
