"""Two real processes (torchrun, gloo on loopback) train with accelerate's DDP and end with identical weights."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from conftest import ROOT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script_args, tmp_path, timeout=240):
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT)}
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(ROOT / "train.py"), *script_args]
    return subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_two_process_ddp_keeps_replicas_identical(text_file, tmp_path):
    ckpt = tmp_path / "ckpt"
    result = torchrun(["pretrain", "--preset", "test", "--data", str(text_file), "--steps", "4", "--seq-len", "32",
                       "--batch-size", "4", "--eval-interval", "4", "--eval-batches", "2", "--sample-interval", "0",
                       "--checkpoint-dir", str(ckpt), "--quiet"], tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((ckpt / "summary.json").read_text())
    assert summary["processes"] == 2 and "MULTI_CPU" in summary["distributed_type"], summary
    a, b = summary["replica_fingerprints"]
    assert a == b  # each rank drew different batches: equal weights means gradients were all-reduced
    state = torch.load(ckpt / "last.pt", weights_only=True)
    assert state["step"] == 4
    assert "replicas in sync: True (2 fingerprint(s))" in result.stdout
