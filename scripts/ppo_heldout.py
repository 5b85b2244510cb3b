"""Evaluate finished PPO runs of the demo task on one larger held-out prompt set, after the fact.

    python scripts/ppo_heldout.py checkpoints/demo/ppo/last.pt [more PPO checkpoints] --prompts 512

Every checkpoint is scored on the same prompts (32-byte windows of the corpus its run used, drawn with --seed), so
runs of different seeds compare like for like. Printed: the gold score of the corpus's own continuations of those
prompts (what real text scores), of the reference policy, of each PPO policy, each run's gain in standard deviations
of the reference's scores with its standard error over prompts, and the gold score that a one-sd gain needs.
The runs must share their initial model and reward model (one reference row).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from palm_rlhf.data import decode_bytes, load_corpus  # noqa: E402
from palm_rlhf.demo import gold_score, gold_scores, prompt_windows  # noqa: E402
from palm_rlhf.ppo import ActorCritic, PPOConfig, PPOTrainer  # noqa: E402
from palm_rlhf.reward import load_reward_model  # noqa: E402
from palm_rlhf.training import load_checkpoint, load_model, make_accelerator  # noqa: E402
from train import gold_gain  # noqa: E402


def trainer_for(state: dict, reward_model, accelerator) -> PPOTrainer:
    args, extra = state["args"], state["extra"]
    actor_critic = ActorCritic(load_model(args["init"]), lora_r=extra["lora_r"], lora_alpha=extra["lora_alpha"])
    actor_critic.load_state_dict(state["model"])
    cfg = PPOConfig(**{f.name: args[f.name] for f in fields(PPOConfig) if f.name in args})
    return PPOTrainer(actor_critic, reward_model, cfg, accelerator=accelerator, gold_fn=gold_scores)


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
                   "for its own held-out set and the iteration seeds for rollouts)")
    args = p.parse_args(argv)
    states = [load_checkpoint(c, stage="ppo") for c in args.checkpoints]
    shared = {(s["args"]["init"], s["args"]["reward"], s["args"]["data"], s["args"]["prompt_len"]) for s in states}
    if len(shared) != 1:
        raise SystemExit(f"the checkpoints must share --init, --reward, --data and --prompt-len (one reference "
                         f"row); got {sorted(shared)}")
    init, reward, data, prompt_len = shared.pop()
    reward_model, accelerator = load_reward_model(reward), make_accelerator()
    corpus = load_corpus(data)
    windows = prompt_windows(corpus, args.prompts, prompt_len + states[0]["args"]["max_new_tokens"], args.seed)
    prompts = [w[:prompt_len] for w in windows]
    real = torch.tensor([gold_score(decode_bytes(w[prompt_len:].tolist())) for w in windows])
    rows = [{"name": "the corpus's own continuations", "gold_score": real.mean().item(),
             "gold_score_std": real.std().item()}]
    reference = None
    for path, state in zip(args.checkpoints, states):
        trainer = trainer_for(state, reward_model, accelerator)
        if reference is None:
            reference = trainer.evaluate(prompts, actor=False)
            rows.append({"name": f"reference policy ({init})", **reference})
        after = trainer.evaluate(prompts, actor=True)
        rows.append({"name": f"PPO {path} (seed {state['args']['seed']})", **after,
                     "gain": gold_gain(reference, after)})
    print(f"\n{args.prompts} held-out prompts (windows drawn with seed {args.seed}); gold score mean ± sd over prompts")
    print("| policy | reward-model score | gold score | KL to reference | gain (sd ± s.e.) |\n|---|---|---|---|---|")
    for r in rows:
        print(row(r["name"], r, r.get("gain")))
    print(f"a gain of one sd needs a mean gold score of {reference['gold_score'] + reference['gold_score_std']:.3f}")
    return rows


if __name__ == "__main__":
    main()
