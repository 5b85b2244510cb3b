"""PPO throughput: rollout + learn samples/s and peak memory, ours vs the anchor, side by side in one run; beside
them on the same model: GRPO and RLOO (no critic; 2 prompts x a group of 8 = the same 16 samples per step) and
DPO's preference pairs/s (no sampling, two sequences per pair).

    python benchmarks/bench_ppo.py                                   # ours only
    python benchmarks/bench_ppo.py --anchor-path /tmp/anchor_site    # + palm-rlhf-pytorch 0.8.0 (RLHFTrainer)

Setting (both): PaLM dim 256, depth 4, heads 4, dim_head 64; prompts of 32 tokens; 64 new tokens; LoRA actor and
critic (r 8); a reward model on the same trunk size; 1 PPO epoch, minibatches of 16 for the like-for-like row.
Ours: 16 prompts per iteration, rolled out together with the KV cache. The anchor: its train() loop with
32 rollouts (one prompt at a time) per learn. Each trainer runs in its own subprocess (peak RSS is per process), the
trainers one after another, --rounds times (best samples/s of each): on a shared VM the speed drifts by +-30% over
minutes, and taking turns spreads the drift over all of them.
Install the anchor beside, never into, this environment:
    pip install --no-deps --target /tmp/anchor_site palm-rlhf-pytorch==0.8.0 adam-atan2-pytorch einx \\
        hl-gauss-pytorch memmap-replay-buffer lion-pytorch frozendict torch-einops-utils loguru
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch


from common import machine, peak_rss_mb, print_table, save_json

SIZE = dict(dim=256, depth=4, heads=4, dim_head=64)


def run_ours(iterations: int, epochs: int, minibatch: int) -> dict:
    from palm_rlhf import ActorCritic, LoRAConfig, PaLM, PaLMConfig, PPOConfig, PPOTrainer, RewardModel
    torch.manual_seed(0)
    config = PaLMConfig(**SIZE, max_seq_len=1024)
    rm = RewardModel(PaLM(config), lora=LoRAConfig(r=8))
    trainer = PPOTrainer(ActorCritic(PaLM(config), lora=LoRAConfig(r=8)), rm, config=PPOConfig(
        prompts_per_iter=16, max_new_tokens=64, ppo_epochs=epochs, minibatch_size=minibatch, lr=1e-4, cpu=True))
    return time_steps(trainer, iterations, prompts_per_step=16)


def time_steps(trainer, iterations: int, prompts_per_step: int) -> dict:
    """One warm-up step, then `iterations` timed steps of an online trainer (16 samples each)."""
    prompts = lambda i: [torch.randint(0, 256, (32,), generator=torch.Generator().manual_seed(i * 100 + j))  # noqa
                         for j in range(prompts_per_step)]
    trainer.step(prompts(0))  # warm-up
    t = time.perf_counter()
    rollout = 0.0
    for i in range(iterations):
        rollout += trainer.step(prompts(i + 1))["rollout_s"]
    elapsed = time.perf_counter() - t
    return {"samples_per_s": 16 * iterations / elapsed, "seconds": elapsed, "samples": 16 * iterations,
            "rollout_share": rollout / elapsed, "peak_rss_mb": peak_rss_mb()}


def run_group(iterations: int, algo: str) -> dict:
    from palm_rlhf import (GRPOConfig, GRPOTrainer, LoRAConfig, PaLM, PaLMConfig, Policy, RewardModel, RLOOConfig,
                           RLOOTrainer)
    torch.manual_seed(0)
    config = PaLMConfig(**SIZE, max_seq_len=1024)
    rm = RewardModel(PaLM(config), lora=LoRAConfig(r=8))
    trainer_cls, config_cls = (GRPOTrainer, GRPOConfig) if algo == "grpo" else (RLOOTrainer, RLOOConfig)
    trainer = trainer_cls(Policy(PaLM(config), lora=LoRAConfig(r=8)), rm, config=config_cls(
        prompts_per_iter=2, group_size=8, max_new_tokens=64, minibatch_size=16, lr=1e-4, cpu=True))
    return time_steps(trainer, iterations, prompts_per_step=2)


def run_dpo(iterations: int) -> dict:
    from palm_rlhf import DPOConfig, DPOTrainer, LoRAConfig, PaLM, PaLMConfig, Policy
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    text = lambda n: bytes(torch.randint(97, 123, (n,), generator=g).tolist()).decode()  # noqa: E731
    pairs = [{"prompt": text(32), "chosen": text(64), "rejected": text(64)} for _ in range(256)]
    trainer = DPOTrainer(Policy(PaLM(PaLMConfig(**SIZE, max_seq_len=1024)), lora=LoRAConfig(r=8)), pairs,
                         DPOConfig(batch_size=16, max_len=96, eval_prompts=0, cpu=True, steps=iterations + 1))
    trainer.training_step(0)  # warm-up
    t = time.perf_counter()
    for i in range(iterations):
        trainer.training_step(i + 1)
    elapsed = time.perf_counter() - t
    return {"samples_per_s": 16 * iterations / elapsed, "seconds": elapsed, "samples": 16 * iterations,
            "peak_rss_mb": peak_rss_mb()}


def run_anchor(rollouts: int) -> dict:
    from palm_rlhf_pytorch import PaLM, RewardModel, RLHFTrainer
    torch.manual_seed(0)
    palm = PaLM(num_tokens=256, **SIZE)
    reward_model = RewardModel(palm, num_binned_output=5)
    prompts = torch.randint(1, 256, (64, 32))
    trainer = RLHFTrainer(palm=palm, reward_model=reward_model, prompt_token_ids=prompts, minibatch_size=16, epochs=1)
    trainer.train(num_episodes=1, max_timesteps=4, update_timesteps=4, max_seq_len=96)  # warm-up
    t = time.perf_counter()
    trainer.train(num_episodes=1, max_timesteps=rollouts, update_timesteps=rollouts, max_seq_len=96)
    elapsed = time.perf_counter() - t
    return {"samples_per_s": rollouts / elapsed, "seconds": elapsed, "samples": rollouts, "peak_rss_mb": peak_rss_mb()}


def child(which: str, args) -> dict:
    env = dict(os.environ)
    if which == "anchor":
        env["PYTHONPATH"] = args.anchor_path + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, __file__, "--child", which, "--iterations", str(args.iterations)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    if out.returncode != 0:
        raise RuntimeError(f"{which} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iterations", type=int, default=4, help="timed iterations of ours (16 samples each)")
    p.add_argument("--anchor-path", default=None)
    p.add_argument("--rounds", type=int, default=1, help="run every trainer this many times, taking turns; keep the best")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    if args.child == "ours":
        print(json.dumps(run_ours(args.iterations, epochs=1, minibatch=16)))
        return
    if args.child == "ours4":
        print(json.dumps(run_ours(args.iterations, epochs=4, minibatch=8)))
        return
    if args.child == "anchor":
        print(json.dumps(run_anchor(rollouts=2 * args.iterations * 4)))
        return
    if args.child == "dpo":
        print(json.dumps(run_dpo(args.iterations)))
        return
    if args.child in ("grpo", "rloo"):
        print(json.dumps(run_group(args.iterations, args.child)))
        return
    trainers = {"palm-rlhf, 1 epoch, minibatch 16": "ours",
                "palm-rlhf, defaults (4 epochs, minibatch 8)": "ours4",
                "palm-rlhf GRPO (no critic), 2 prompts x 8, 1 epoch, minibatch 16": "grpo",
                "palm-rlhf RLOO (no critic), 2 prompts x 8, 1 epoch, minibatch 16": "rloo",
                "palm-rlhf DPO (samples = preference pairs), batch 16": "dpo"}
    if args.anchor_path:
        trainers["palm-rlhf-pytorch 0.8.0 RLHFTrainer, 1 epoch, minibatch 16"] = "anchor"
    rows, every = {}, {name: [] for name in trainers}
    for _ in range(args.rounds):
        for name, which in trainers.items():
            run = child(which, args)
            every[name].append(run["samples_per_s"])
            if name not in rows or run["samples_per_s"] > rows[name]["samples_per_s"]:
                rows[name] = {**run, "samples_per_s_every_round": every[name]}
    print_table(f"PPO rollout + learn, prompt 32, +64 tokens, {machine()}, best of {args.rounds} round(s)",
                ["trainer", "samples", "seconds", "samples/s", "every round", "peak RSS MiB"],
                [[k, v["samples"], v["seconds"], v["samples_per_s"], " / ".join(f"{x:.3g}" for x in every[k]),
                  v["peak_rss_mb"]] for k, v in rows.items()])
    if args.anchor_path:
        ours, anchor = "palm-rlhf, 1 epoch, minibatch 16", "palm-rlhf-pytorch 0.8.0 RLHFTrainer, 1 epoch, minibatch 16"
        per_round = " / ".join(f"{o / a:.1f}x" for o, a in zip(every[ours], every[anchor]))
        print(f"\nratio (like for like): {rows[ours]['samples_per_s'] / rows[anchor]['samples_per_s']:.1f}x the "
              f"anchor's samples/s (best against best); round by round {per_round}")
    save_json(args.json, {"ppo": rows})


if __name__ == "__main__":
    main()
