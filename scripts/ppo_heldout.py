"""Evaluate finished PPO runs of the demo task on one larger held-out prompt set, after the fact.

    python scripts/ppo_heldout.py checkpoints/demo/ppo/last.pt [more PPO checkpoints] --prompts 512

Every checkpoint is scored on the same prompts (32-byte windows of the corpus its run used, drawn with --seed), so
runs of different seeds compare like for like. Printed: the gold score of the corpus's own continuations of those
prompts (what real text scores), of the reference policy, of each PPO policy, each run's gain in standard deviations
of the reference's scores with its standard error over prompts, and the gold score that a one-sd gain needs.
The runs must share their initial model, reward model, corpus and prompt length (one reference row): each
checkpoint names them (the inputs of the `train.py ppo` command that wrote it); --reward and --data override.
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from palm_rlhf import ActorCritic, PPOConfig, PPOTrainer, RewardModel, load_corpus
from palm_rlhf.checkpoint import read_training_state
from palm_rlhf.data import decode_bytes, prompt_windows
from palm_rlhf.judges import prose
from palm_rlhf.rollout import score_gain
from palm_rlhf.training import make_accelerator


def row(name: str, r: dict, gain: tuple[float, float] | None = None) -> str:
    kl = f"{r['kl']:.2f}" if "kl" in r else "-"
    g = f"{gain[0]:+.2f} ± {gain[1]:.2f}" if gain else "-"
    rm = f"{r['rm_score']:.3f}" if "rm_score" in r else "-"
    return f"| {name} | {rm} | {r['gold_score']:.3f} ± {r['gold_score_std']:.3f} | {kl} | {g} |"


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoints", nargs="+", help="PPO checkpoints (last.pt) of the demo task")
    p.add_argument("--prompts", type=int, default=512, help="held-out prompts")
    p.add_argument("--seed", type=int, default=20_000, help="draws the prompt windows (training used 10000+seed "
                   "for its own held-out set and the step seeds for rollouts)")
    p.add_argument("--reward", default=None, help="reward model (default: the one each run used)")
    p.add_argument("--data", default=None, help="corpus of the prompts (default: the one each run used)")
    args = p.parse_args(argv)
    states = [read_training_state(c, stage="ppo") for c in args.checkpoints]
    runs = [s["metadata"] for s in states]
    if not args.reward and any("reward" not in r for r in runs):
        raise SystemExit("a run trained on a reward function (--reward-fn) names no reward model: give one with "
                         "--reward to score the runs with")
    shared = {(r["init"], args.reward or r["reward"], args.data or r["data"], r["prompt_len"]) for r in runs}
    if len(shared) != 1:
        raise SystemExit(f"the checkpoints must share --init, --reward, --data and --prompt-len (one reference "
                         f"row); got {sorted(shared)}")
    init, reward, data, prompt_len = shared.pop()
    reward_model, accelerator = RewardModel.load(reward), make_accelerator()
    new_tokens = states[0]["trainer_config"]["max_new_tokens"]
    windows = prompt_windows(load_corpus(data), args.prompts, prompt_len + new_tokens, args.seed)
    prompts = [w[:prompt_len] for w in windows]
    real = torch.tensor([prose(decode_bytes(w[prompt_len:].tolist())) for w in windows])
    rows = [{"name": "the corpus's own continuations", "gold_score": real.mean().item(),
             "gold_score_std": real.std().item()}]
    reference = None
    for path, state in zip(args.checkpoints, states):
        settings = {f.name: state["trainer_config"][f.name] for f in dataclasses.fields(PPOConfig)}
        config = PPOConfig(**{**settings, "seed": 0})  # every run samples its evaluation with the same seed
        trainer = PPOTrainer(ActorCritic.load(path), reward_model, config=config, gold_fn=prose,
                             accelerator=accelerator)
        if reference is None:
            reference = trainer.evaluate_policy(prompts, actor=False)
            rows.append({"name": f"reference policy ({init})", **reference})
        after = trainer.evaluate_policy(prompts, actor=True)
        rows.append({"name": f"PPO {path} (seed {state['trainer_config']['seed']})", **after,
                     "gain": score_gain(reference, after)})
    print(f"\n{args.prompts} held-out prompts (windows drawn with seed {args.seed}); gold score mean ± sd over prompts")
    print("| policy | reward-model score | gold score | KL to reference | gain (sd ± s.e.) |\n|---|---|---|---|---|")
    for r in rows:
        print(row(r["name"], r, r.get("gain")))
    print(f"a gain of one sd needs a mean gold score of {reference['gold_score'] + reference['gold_score_std']:.3f}")
    return rows


if __name__ == "__main__":
    main()
