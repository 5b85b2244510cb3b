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


@pytest.mark.slow
def test_two_process_ppo(text_file, tmp_path):
    """PPO under DDP: each rank rolls out its own prompts; the adapters stay identical across ranks."""
    from palm_rlhf import cli
    common = ["--data", str(text_file), "--quiet"]
    cli.main(["pretrain", "--preset", "test", "--steps", "4", "--seq-len", "32", "--batch-size", "4",
                "--eval-interval", "4", "--eval-batches", "1", "--sample-interval", "0",
                "--checkpoint-dir", str(tmp_path / "base"), *common])
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join(json.dumps({"prompt": "p", "chosen": "eee", "rejected": "xyz"}) for _ in range(20)))
    cli.main(["reward", "--init", str(tmp_path / "base" / "last.pt"), "--train", str(pairs), "--steps", "2",
                "--max-len", "16", "--checkpoint-dir", str(tmp_path / "rm"), "--quiet"])
    result = torchrun(["ppo", "--init", str(tmp_path / "base" / "last.pt"), "--reward", str(tmp_path / "rm" / "last.pt"),
                       "--steps", "2", "--prompt-len", "8", "--prompts-per-iter", "4", "--minibatch-size", "2",
                       "--max-new-tokens", "8", "--ppo-epochs", "2", "--eval-prompts", "4", "--best-of", "0",
                       "--checkpoint-dir", str(tmp_path / "ppo"), *common], tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((tmp_path / "ppo" / "eval.json").read_text())
    assert summary["processes"] == 2 and "MULTI_CPU" in summary["distributed_type"]
    a, b = summary["replica_fingerprints"]
    assert a == b
