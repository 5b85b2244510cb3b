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
