"""Two real processes (torchrun, gloo on loopback): accelerate's DDP keeps replicas identical, and sharded training
(FSDP2) takes the same steps as DDP in every stage; checkpoints resume exactly, and a sharded run's checkpoint
resumes in one unsharded process.

Tolerance: FSDP reduce-scatters gradients where DDP all-reduces them, so float32 sums may be added in another order;
with 2 processes the difference is a rounding of the last bits (measured: losses equal to 7 decimals, weights within
4e-9 after 4 steps). 1e-5 relative on losses and 1e-6 absolute on weights is far below any learning signal and far
above that rounding; a missing gradient sync (each process learning alone) breaks it at the first step."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from palm_rlhf import PaLM, PaLMConfig, cli


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script_args, tmp_path, timeout=240, script=ROOT / "train.py"):
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT)}
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(script), *script_args]
    return subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=timeout)


pytestmark = pytest.mark.slow
PAIRS = [{"prompt": f"p{i} ", "chosen": "eee ee", "rejected": "xyz!?"} for i in range(24)]
DEMOS = [{"prompt": f"Q{i}: ", "response": "fine, thanks."} for i in range(24)]


def metric(ckpt, key="loss") -> list[float]:
    rows = [json.loads(line) for line in (ckpt / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in rows if key in r]


def weights(ckpt) -> dict:
    return torch.load(ckpt / "last.pt", weights_only=True)["model"]


def assert_same_run(a, b, key="loss"):
    torch.testing.assert_close(metric(a, key), metric(b, key), rtol=1e-5, atol=1e-7)
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6, msg=k)


def run(runs, tmp_path) -> str:
    """Each (train.py arguments, checkpoint dir, *extra arguments) in turn, in one 2-process launch."""
    commands = tmp_path / f"commands-{free_port()}.json"
    commands.write_text(json.dumps([[*args, "--checkpoint-dir", str(ckpt), "--quiet", *extra]
                                    for args, ckpt, *extra in runs]))
    result = torchrun([str(commands)], tmp_path, timeout=300, script=ROOT / "tests" / "launch_many.py")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = tmp_path_factory.mktemp("fsdp") / "base"
    torch.manual_seed(0)
    PaLM(PaLMConfig.preset("test")).save(path)
    return path


def test_pretraining_ddp_keeps_replicas_identical_and_sharded_takes_the_same_steps(text_file, tmp_path):
    args = ["pretrain", "--preset", "test", "--data", str(text_file), "--steps", "4", "--seq-len", "32",
            "--batch-size", "4", "--eval-interval", "4", "--eval-batches", "2", "--sample-interval", "0"]
    ddp, fsdp, halves = tmp_path / "ddp", tmp_path / "fsdp", tmp_path / "halves"
    out = run([(args, ddp), (args, fsdp, "--fsdp"), (args, halves, "--fsdp", "--stop-after", "2"),
               (args, halves, "--fsdp", "--resume", "auto")], tmp_path)
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["processes"] == 2 and "MULTI_CPU" in summary["distributed_type"], summary
    a, b = summary["replica_fingerprints"]
    assert a == b  # each rank drew different batches: equal weights means gradients were all-reduced
    assert "replicas in sync: True (2 fingerprint(s))" in out and not summary["sharded"]
    assert "parameters sharded across 2 processes (FSDP)" in out
    summary = json.loads((tmp_path / "fsdp" / "summary.json").read_text())
    assert summary["sharded"] and summary["processes"] == 2
    assert_same_run(tmp_path / "ddp", tmp_path / "fsdp")
    # stopped after 2 steps, resumed: the same weights and optimizer state as the run that was not interrupted
    assert_same_run(tmp_path / "fsdp", tmp_path / "halves")
    a, b = (torch.load(p / "last.pt", weights_only=True)["optimizer"] for p in (tmp_path / "fsdp", tmp_path / "halves"))
    assert a["state"].keys() == b["state"].keys() and all(isinstance(k, str) for k in a["state"])  # by name
    for k in a["state"]:
        torch.testing.assert_close(a["state"][k]["exp_avg_sq"], b["state"][k]["exp_avg_sq"], rtol=0, atol=1e-9)
    # the exported model is a plain single file, and the sharded checkpoint resumes in one unsharded process
    assert PaLM.load(tmp_path / "fsdp" / "model").num_params() == PaLM(PaLMConfig.preset("test")).num_params()
    summary = cli.main([*args[:args.index("--steps")], "--steps", "6", *args[args.index("--steps") + 2:],
                        "--checkpoint-dir", str(halves), "--quiet", "--resume", "auto"])
    assert summary["final_step"] == 6 and summary["processes"] == 1 and all(map(torch.isfinite,
                                                                                torch.tensor(summary["losses"])))


def test_fine_tuning_stages_sharded_equal_ddp(base, tmp_path):
    """Reward model, DPO, SFT and ILQL (its Q/V heads and Polyak targets in the root unit) under FSDP and DDP."""
    prefs, demos = tmp_path / "prefs.jsonl", tmp_path / "demos.jsonl"
    prefs.write_text("\n".join(json.dumps(p) for p in PAIRS))
    demos.write_text("\n".join(json.dumps(d) for d in DEMOS))
    scored = tmp_path / "scored.jsonl"   # ILQL's data: scored responses
    scored.write_text("\n".join(json.dumps({"prompt": p["prompt"], "response": r, "reward": float(r == p["chosen"])})
                                for p in PAIRS for r in (p["chosen"], p["rejected"])))
    stages = {
        "reward": ["reward", "--init", str(base), "--train", str(prefs), "--steps", "3", "--batch-size", "4",
                   "--max-len", "24", "--pool", "sum", "--lora-r", "4"],
        "dpo": ["dpo", "--init", str(base), "--train", str(prefs), "--steps", "3", "--batch-size", "4",
                "--max-len", "24", "--eval-prompts", "2", "--max-new-tokens", "4", "--lora-r", "4"],
        "sft": ["sft", "--init", str(base), "--train", str(demos), "--steps", "3", "--batch-size", "4",
                "--max-len", "24", "--lora-r", "4"],
        "ilql": ["ilql", "--init", str(base), "--train", str(scored), "--steps", "3", "--batch-size", "4",
                 "--max-len", "24", "--eval-prompts", "2", "--max-new-tokens", "4", "--lora-r", "4"],
    }
    run([(args, tmp_path / f"{name}-{mode}", *extra) for name, args in stages.items()
         for mode, extra in (("ddp", []), ("fsdp", ["--fsdp"]))], tmp_path)
    for name in stages:
        assert_same_run(tmp_path / f"{name}-ddp", tmp_path / f"{name}-fsdp")
        assert (tmp_path / f"{name}-fsdp" / "model" / "model.safetensors").is_file()


def test_online_rl_with_sharded_rollouts_equals_ddp(base, text_file, tmp_path):
    """PPO (actor, critic and the LoRA-off reference on one sharded base) and GRPO: the policy is gathered for
    sampling, the updates are sharded; every metric of every step equals DDP's."""
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join(json.dumps(p) for p in PAIRS))
    cli.main(["reward", "--init", str(base), "--train", str(pairs), "--steps", "2", "--max-len", "16",
              "--checkpoint-dir", str(tmp_path / "rm"), "--quiet"])
    common = ["--init", str(base), "--reward", str(tmp_path / "rm" / "last.pt"), "--steps", "2", "--prompt-len", "8",
              "--prompts-per-iter", "4", "--minibatch-size", "2", "--max-new-tokens", "8", "--eval-prompts", "4",
              "--best-of", "0", "--data", str(text_file)]
    algos = {"ppo": ["--ppo-epochs", "2"], "grpo": ["--group-size", "2"]}
    run([([algo, *common, *extra], tmp_path / f"{algo}-{mode}", *flag) for algo, extra in algos.items()
         for mode, flag in (("ddp", []), ("fsdp", ["--fsdp"]))], tmp_path)
    for algo in algos:
        summary = json.loads((tmp_path / f"{algo}-ddp" / "eval.json").read_text())   # each rank its own prompts
        assert summary["processes"] == 2 and len(set(summary["replica_fingerprints"])) == 1
        for key in ("policy_loss", "kl", "rm_score"):
            torch.testing.assert_close(metric(tmp_path / f"{algo}-ddp", key), metric(tmp_path / f"{algo}-fsdp", key),
                                       rtol=1e-5, atol=1e-7)
        assert_same_run(tmp_path / f"{algo}-ddp", tmp_path / f"{algo}-fsdp", key="policy_loss")


def test_sharding_one_process_is_refused_with_the_fix(base, tmp_path):
    demos = tmp_path / "demos.jsonl"
    demos.write_text("\n".join(json.dumps(d) for d in DEMOS))
    with pytest.raises(RuntimeError, match="launch 2 or more"):
        cli.main(["sft", "--init", str(base), "--train", str(demos), "--steps", "1", "--fsdp", "--quiet",
                  "--checkpoint-dir", str(tmp_path / "sft")])
