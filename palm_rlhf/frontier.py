"""The reward-vs-KL frontier of every method on one task (the DPO paper's Figure 2; Gao et al. 2022's
over-optimisation panel), from one pretrained checkpoint:

    python -m palm_rlhf.frontier --init checkpoints/pretrain/model --data enwik6 --out runs/frontier [--quick]

1. Task: prompts are windows of the corpus, responses sampled from the checkpoint, the gold judge (default:
   sentiment, VADER) labels pairs of them (ties skipped); a reward model (summed head, LoRA) learns the pairs.
2. One set of held-out prompts; every method's final policy answers them and is scored by the gold judge, the
   reward model (the proxy) and its KL to the reference (nats per response, from its samples):
   - best-of-N from the reference, N = 1, 2, 4, ... (the reward model picks; KL is the analytic bound);
   - PPO against the reward model at several fixed KL coefficients, each with several KL budgets (a run ends at the
     first step whose rollouts pass its budget), and PPO on the gold judge itself (the upper reference; its scores
     normalised by their running mean and sd, since most are exactly 0);
   - DPO at several betas, on the pairs the reward model saw, less the real-text ones when the task mixed them in
     (`--corpus-pairs`): DPO learns from the policy's own samples; `--dpo-evals K` adds K - 1 points along each run;
   - GRPO and RLOO against the reward model (no critic; 4 prompts x 8 samples per step; with a summed reward
     model each token is credited with the reward still to come from it, as PPO's dense reward);
   - ILQL, offline: trained on reference samples the gold judge scored (no sampling while training), then sampled
     at several betas (top-k 20, so even beta 0 has a KL > 0);
   each over several seeds (mean and spread). `--methods` runs a subset.
   Each finished run's result is kept in --out/points/; the same command run again (after a crash or Ctrl-C, or with
   more seeds or settings) reads those back and runs only what is missing; a run whose settings changed (the shared
   ones, or its own method's) is run again. `--workers N` runs the sweep in N processes that share it (each claims
   the next run nobody has started; the torch threads split between them), then reports as one.
3. frontier.png (gold vs KL; proxy and gold vs sqrt(KL) for best-of-N and the longest PPO run), frontier.json and
   frontier.md (the table), in --out.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from itertools import product
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch

from .data import DATASETS, decode_bytes, load_corpus, prompt_sampler, prompt_windows
from .demo import PreferenceTaskConfig, make_preference_files
from .dpo import DPOConfig, DPOTrainer
from .feedback import collate, encode, load_preferences
from .judges import judge_reward, judge_texts, load_judge
from .lora import LoRAConfig
from .metrics import save_plot
from .palm import PaLM
from .policy import ActorCritic, Policy
from .ppo import PPOConfig, PPOTrainer
from .reward import RewardConfig, RewardModel, RewardTrainer
from .grpo import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer
from .ilql import ILQLConfig, ILQLModel, ILQLTrainer, evaluate_ilql
from .rollout import evaluate_policy, reward_function, sample, score
from .utils import atomic_write_text, option, write_jsonl


METHODS = ("best-of-n", "ppo", "ppo-gold", "dpo", "grpo", "rloo", "ilql")


@dataclass
class FrontierConfig:
    judge: str = option("sentiment", "gold judge: sentiment, prose or module:function")
    eval_prompts: int = option(512, "held-out prompts every policy answers")
    pairs: int = option(3000, "preference pairs (reward model and DPO)")
    per_prompt: int = option(4, "responses sampled per prompt for the pairs (every non-tie pair of them is kept)")
    corpus_pairs: int = option(0, "also this many pairs of real continuations for the reward model (README: the "
                                  "sentiment task); DPO learns from the sampled pairs alone")
    val_pairs: int = option(400, "held-out pairs")
    rm_steps: int = option(400, "reward-model steps")
    rm_lora_r: int = option(16, "reward-model LoRA rank")
    best_of: tuple = option((1, 2, 4, 8, 16, 32, 64), "best-of-N values")
    ppo_kl_coefs: tuple = option((0.02, 0.05, 0.2), "fixed KL coefficients of the PPO runs on the reward model")
    ppo_kl_budgets: tuple = option((0.0,), "KL budgets of the PPO runs on the reward model (nats per response; 0 = "
                                           "none), each with every coefficient: a run ends at the first step whose "
                                           "rollouts pass its budget")
    ppo_steps: int = option(40, "PPO iterations per run (with a budget: at most)")
    ppo_lr: float = option(5e-4, "PPO learning rate (LoRA)")
    ppo_dense_reward: bool = option(True, "PPO on the reward model credits each token its own score (PPOConfig."
                                          "dense_reward; the frontier's reward models are summed): with the total "
                                          "at the last token PPO barely moved the reward model's score (README)")
    ppo_normalize_reward: bool = option(True, "PPO's rewards divided by their running sd after the running mean is "
                                        "taken off (a Bradley-Terry reward model's offset is arbitrary: README)")
    long_ppo_steps: int = option(80, "iterations of the one PPO run pushed past its KL budget (0 = none)")
    dpo_betas: tuple = option((0.05, 0.1, 0.3), "DPO betas")
    dpo_steps: int = option(200, "DPO steps per run")
    dpo_lr: float = option(1e-3, "DPO learning rate (LoRA)")
    dpo_evals: int = option(1, "points along each DPO run: its policy evaluated after every dpo_steps / this steps "
                               "(the last is the run's point; the others join the plot and table as 'DPO, along "
                               "training')")
    group_kl_coefs: tuple = option((0.05,), "KL coefficients of the GRPO and RLOO runs on the reward model")
    group_steps: int = option(40, "GRPO / RLOO iterations per run")
    group_prompts: int = option(4, "GRPO / RLOO prompts per iteration (each answered group-size 8 times)")
    group_dense_reward: bool = option(True, "GRPO / RLOO on a summed reward model credit each token the reward "
                                            "still to come from it (GroupConfig.dense_reward), as PPO's dense reward")
    group_epochs: int = option(4, "GRPO / RLOO passes over each step's samples (one pass barely moves: README)")
    group_kl_budget: float = option(0.0, "KL budget of the GRPO / RLOO runs (nats per response; 0 = none): a run "
                                         "ends at the first step whose rollouts pass it")
    ilql_samples: int = option(4096, "reference samples scored by the gold judge: ILQL's offline data")
    ilql_steps: int = option(300, "ILQL steps")
    ilql_betas: tuple = option((1.0, 4.0, 16.0), "ILQL generation betas")
    methods: tuple = option(METHODS, "which methods to run")
    seeds: int = option(3, "seeds per method")
    ppo_seeds: int | None = option(None, "seeds of the PPO runs (default: --seeds): PPO costs the most per point")
    prompt_len: int = option(32, "prompt bytes")
    response_len: int = option(64, "response bytes")
    lora_r: int = option(16, "policy LoRA rank (PPO, DPO)")


SWEPT = ("methods", "seeds", "ppo_seeds", "best_of", "ppo_kl_coefs", "ppo_kl_budgets", "dpo_betas",
         "group_kl_coefs")  # in the run's name
OWN = ("ppo_", "long_ppo_", "dpo_", "group_", "ilql_")  # settings of one method only: they rerun that method alone
SHOWN = 3  # responses kept per method (to the first held-out prompts), so a person can see what each one writes
QUICK = dict(eval_prompts=128, pairs=1500, val_pairs=200, rm_steps=150, best_of=(1, 2, 4, 8), ppo_kl_coefs=(0.05,),
             ppo_steps=12, long_ppo_steps=0, dpo_betas=(0.1,), dpo_steps=60, group_steps=12, ilql_samples=1024,
             ilql_steps=100, ilql_betas=(4.0,), seeds=1)


def mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value: one seed has no spread to show)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


class Frontier:
    def __init__(self, init: str, corpus: torch.Tensor, out: Path, cfg: FrontierConfig, quiet: bool = True, *,
                 pairs: tuple[str, str] | None = None, reward: str | None = None, report_only: bool = False,
                 dpo_pairs: str | None = None, claim: bool = False, started: float | None = None):
        self.init, self.corpus, self.out, self.cfg, self.quiet = init, corpus, out, cfg, quiet
        self.given_pairs, self.given_reward = pairs, reward  # bring your own preference files / reward model
        self.given_dpo_pairs = dpo_pairs
        self.report_only, self.missing, self.run_seconds = report_only, [], []  # see cached()
        self.claim, self.started = claim, started   # a worker of --workers N; when the sweep began (the parent's)
        self.judge = load_judge(cfg.judge)
        self.prompts = prompt_sampler(corpus, cfg.prompt_len)
        self.eval_set = prompt_windows(corpus, cfg.eval_prompts, cfg.prompt_len, seed=987_654)
        self.sampling = PPOConfig(max_new_tokens=cfg.response_len, eval_prompts=2)  # temperature 1, no EOS
        self.points: list[dict] = []
        self.curves: dict[str, list[dict]] = {}
        self.reference: dict = {}

    def log(self, text: str) -> None:
        print(f"[frontier {time.strftime('%H:%M:%S')}] {text}", flush=True)

    def evaluate(self, policy: Policy, reward_fn, seed: int) -> dict:
        g = torch.Generator().manual_seed(seed)
        out = evaluate_policy(policy, reward_fn, self.eval_set, self.sampling, g, actor=True, gold_fn=self.judge)
        gen = sample(policy, self.eval_set[:SHOWN], self.sampling, torch.Generator().manual_seed(seed + 1))
        out["samples"] = [decode_bytes(t[m].tolist()) for t, m in zip(gen.tokens.cpu(), gen.mask.cpu())]
        return out

    def add(self, method: str, setting: str, seed: int, result: dict, **extra) -> None:
        row = {"method": method, "setting": setting, "seed": seed, "gold": result["gold_score"],
               "gold_std": result["gold_score_std"], "kl": result.get("kl", result.get("kl_bound")),
               "proxy": result.get("rm_score"), "samples": result.get("samples", []), **extra}
        self.points.append(row)
        self.log(f"{method} {setting} seed {seed}: gold {row['gold']:.3f}, KL {row['kl']:.2f}")

    def cached(self, name: str, own: tuple[str, ...], run):
        """run() once per (name, settings): its JSON result is kept in out/points/NAME.json and read back when the
        sweep runs again with the same shared settings and the same settings of its own (fields starting with `own`);
        what is swept (the lists of settings, the seed counts) is in the name."""
        settings = json.loads(json.dumps(asdict(self.cfg)))  # tuples as lists, as they read back
        relevant = [k for k in settings if k not in SWEPT and (not k.startswith(OWN) or k.startswith(own))]
        path = self.out / "points" / f"{name}.json"
        if path.is_file():
            saved = json.loads(path.read_text())
            if all(saved["settings"].get(k) == settings[k] for k in relevant):
                self.run_seconds.append(saved.get("seconds"))
                return saved["result"]
            self.log(f"{name}: settings changed since it ran, "
                     + ("left out" if self.report_only else "running it again"))
        if self.report_only:
            self.missing.append(name)
            return None
        path.parent.mkdir(parents=True, exist_ok=True)
        claim = path.with_suffix(".claim")
        if self.claim and own:   # a worker: run it only if no other worker has (the shared reference draw: never)
            try:
                os.close(os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                return None
        self.log(f"{name}: running")
        t0 = time.time()
        result = run()
        self.run_seconds.append(time.time() - t0)
        atomic_write_text(json.dumps({"settings": settings, "result": result, "seconds": self.run_seconds[-1]}), path)
        claim.unlink(missing_ok=True)
        return result

    # ------------------------------------------------------------------------------------------------ stages

    def task(self) -> tuple[Path, Path]:
        c, data = self.cfg, self.out / "data"
        if self.given_pairs:
            return tuple(Path(p) for p in self.given_pairs)
        if not (data / "train.jsonl").is_file():
            model = PaLM.load(self.init).eval()
            make_preference_files(model, self.corpus, data, PreferenceTaskConfig(
                judge=c.judge, pairs=c.pairs, val_pairs=c.val_pairs, demos=1, prompt_len=c.prompt_len,
                response_len=c.response_len, flip=0.0, min_gap=0.05, per_prompt=c.per_prompt,
                corpus_pairs=c.corpus_pairs, quiet=self.quiet))
        return data / "train.jsonl", data / "val.jsonl"

    def dpo_pairs(self, train: Path) -> Path:
        """DPO's pairs: given, or the task's sampled pairs alone when it mixed in real text (DPO learns from the
        policy's own samples; real continuations it would not write pull it off-policy: README), or the RM's."""
        if self.given_dpo_pairs:
            return Path(self.given_dpo_pairs)
        sampled = train.parent / "train_sampled.jsonl"
        return sampled if not self.given_pairs and sampled.is_file() else train

    def reward_model(self, train: Path, val: Path) -> RewardModel:
        path = Path(self.given_reward) if self.given_reward else self.out / "reward" / "model"
        if not self.given_reward and not path.is_dir():
            torch.manual_seed(0)
            rm = RewardModel(PaLM.load(self.init), lora=LoRAConfig(r=self.cfg.rm_lora_r), pool="sum")
            RewardTrainer(rm, train, RewardConfig(steps=self.cfg.rm_steps, batch_size=16, lr=1e-3, max_len=96,
                                                  eval_interval=50, pool="sum", quiet=self.quiet,
                                                  checkpoint_dir=str(self.out / "reward")),
                          val=val, gold_fn=self.judge).train()
        rm = RewardModel.load(path).eval()
        pairs = load_preferences(val)
        self.rm_accuracy = {"val_gold_acc": self.pair_accuracy(rm, pairs), "pairs": len(pairs)}
        return rm

    @torch.no_grad()
    def pair_accuracy(self, rm: RewardModel, pairs: list[dict]) -> float:
        """The reward model's agreement with the gold judge on held-out pairs (ties under the judge left out)."""
        gold = [(self.judge(r["chosen"]), self.judge(r["rejected"])) for r in pairs]
        rows = [(r, c > j) for r, (c, j) in zip(pairs, gold) if c != j]
        right = 0
        for i in range(0, len(rows), 32):
            chunk = rows[i:i + 32]
            b = collate([encode(r["prompt"], r[k], 256) for r, _ in chunk for k in ("chosen", "rejected")])
            s = rm.score(b["tokens"], b["mask"], b["response_mask"]).view(-1, 2)
            right += ((s[:, 0] > s[:, 1]) == torch.tensor([label for _, label in chunk])).sum().item()
        return right / max(len(rows), 1)

    def reference_draw(self, rm: RewardModel, n_max: int) -> dict:
        """n_max reference samples per held-out prompt: gold and proxy scores (prompts x n_max), the first texts."""
        base = Policy(PaLM.load(self.init), lora=LoRAConfig(r=1))  # adapter B = 0: the reference itself
        g = torch.Generator().manual_seed(12345)
        gold, proxy, texts = [], [], []
        for chunk in range(0, len(self.eval_set), 32):
            gen = sample(base, self.eval_set[chunk:chunk + 32], self.sampling, g, policy="reference", n=n_max)
            proxy.append(score(rm.score, gen)[0].view(-1, n_max))
            gold.append(judge_texts(self.judge, gen.tokens, gen.mask).view(-1, n_max))
            if chunk == 0:
                texts = [decode_bytes(t[m].tolist()) for t, m in zip(gen.tokens[:SHOWN * n_max].cpu(),
                                                                      gen.mask[:SHOWN * n_max].cpu())]
        return {"gold": torch.cat(gold).tolist(), "proxy": torch.cat(proxy).tolist(), "texts": texts}

    def best_of_n(self, rm: RewardModel) -> None:
        """One draw of max(N) reference samples per prompt; best-of-N for each N reads its first N."""
        c, n_max = self.cfg, max(self.cfg.best_of)
        draw = self.cached(f"reference-{n_max}-samples", (), lambda: self.reference_draw(rm, n_max))
        if draw is None:
            raise FileNotFoundError(f"--report-only: no reference draw of {n_max} samples per prompt in "
                                    f"{self.out / 'points'}; run the sweep first")
        gold, proxy, texts = torch.tensor(draw["gold"]), torch.tensor(draw["proxy"]), draw["texts"]
        self.reference = {"gold": gold[:, 0].mean().item(), "gold_std": gold[:, 0].std().item(),
                          "proxy": proxy[:, 0].mean().item()}
        curve = []
        for n in c.best_of:
            pick = proxy[:, :n].argmax(dim=1)
            rows = torch.arange(len(pick))
            kl, picked_gold, picked_proxy = math.log(n) - (n - 1) / n, gold[rows, pick], proxy[rows, pick]
            shown = [texts[i * n_max + pick[i]] for i in range(min(SHOWN, len(pick)))]
            self.add("best-of-N", f"N={n}", 0, {"gold_score": picked_gold.mean().item(), "kl_bound": kl,
                                                 "gold_score_std": picked_gold.std().item(),
                                                 "rm_score": picked_proxy.mean().item(), "samples": shown})
            curve.append({"kl": kl, "gold": picked_gold.mean().item(), "proxy": picked_proxy.mean().item()})
        self.curves["best-of-N"] = curve

    def ppo(self, rm: RewardModel | None, kl_coef: float, seed: int, steps: int, name: str,
            kl_budget: float = 0.0) -> dict:
        c = self.cfg
        torch.manual_seed(seed)
        ac = ActorCritic(PaLM.load(self.init), lora=LoRAConfig(r=c.lora_r))
        reward = rm if rm is not None else judge_reward(self.judge)  # a model, or the judge as a function
        cfg = PPOConfig(steps=steps, lr=c.ppo_lr, prompts_per_iter=16, minibatch_size=8, ppo_epochs=4,
                        max_new_tokens=c.response_len, kl_coef=kl_coef, adaptive_kl=False, kl_budget=kl_budget,
                        eval_prompts=2,
                        best_of=0, seed=seed, quiet=self.quiet, critic_from_reward=rm is not None,
                        normalize_reward=c.ppo_normalize_reward or rm is None,  # README says why, for each
                        dense_reward=c.ppo_dense_reward and rm is not None and rm.pool == "sum",
                        checkpoint_interval=max(steps, 1), checkpoint_dir=str(self.out / "runs" / f"{name}-s{seed}"))
        summary = PPOTrainer(ac, reward, self.prompts, cfg, gold_fn=self.judge).train()
        result = self.evaluate(ac, reward_function(reward), seed)
        return {"result": result, "history": summary["history"], "steps": summary["final_step"]}

    def dpo(self, train: Path, val: Path, beta: float, seed: int) -> dict:
        c = self.cfg
        torch.manual_seed(seed)
        policy = Policy(PaLM.load(self.init), lora=LoRAConfig(r=c.lora_r))
        cfg = DPOConfig(steps=c.dpo_steps, batch_size=16, lr=c.dpo_lr, warmup=20, beta=beta, max_len=96,
                        eval_prompts=0, eval_interval=0, seed=seed, quiet=self.quiet,
                        checkpoint_interval=max(c.dpo_steps, 1),
                        checkpoint_dir=str(self.out / "runs" / f"dpo-beta{beta}-s{seed}"))
        trainer, along = DPOTrainer(policy, train, cfg, val=val), []
        stops = sorted({max(1, round(c.dpo_steps * (i + 1) / c.dpo_evals)) for i in range(max(c.dpo_evals, 1))})
        for stop in stops:   # the same training in pieces: the data order and lr follow the step
            trainer.config.stop_after = stop - trainer.global_step
            summary = trainer.train()
            result = self.evaluate(policy, self.rm.score, seed)
            along.append({"step": stop, "result": result, "val_acc": summary.get("val_acc")})
        return {**along[-1], "along": along[:-1]}

    def group(self, algo: str, kl_coef: float, seed: int) -> dict:
        """GRPO or RLOO against the reward model."""
        c = self.cfg
        torch.manual_seed(seed)
        policy = Policy(PaLM.load(self.init), lora=LoRAConfig(r=c.lora_r))
        config_cls, trainer_cls = (GRPOConfig, GRPOTrainer) if algo == "grpo" else (RLOOConfig, RLOOTrainer)
        cfg = config_cls(steps=c.group_steps, lr=5e-4, prompts_per_iter=c.group_prompts, group_size=8,
                         minibatch_size=16, dense_reward=c.group_dense_reward and self.rm.pool == "sum",
                         epochs=c.group_epochs, max_new_tokens=c.response_len, kl_coef=kl_coef,
                         kl_budget=c.group_kl_budget, eval_prompts=2,
                         best_of=0, seed=seed,
                         quiet=self.quiet, checkpoint_interval=max(c.group_steps, 1),
                         checkpoint_dir=str(self.out / "runs" / f"{algo}-kl{kl_coef}-s{seed}"))
        trainer_cls(policy, self.rm, self.prompts, cfg, gold_fn=self.judge).train()
        return self.evaluate(policy, self.rm.score, seed)

    def ilql_data(self) -> Path:
        """Reference samples on training prompts, scored by the gold judge: {"prompt", "response", "reward"}."""
        path = self.out / "data" / "scored.jsonl"
        if not path.is_file():
            base = Policy(PaLM.load(self.init), lora=LoRAConfig(r=1))   # adapter B = 0: the reference
            prompts, rows = self.prompts(self.cfg.ilql_samples, 424_242), []
            for i in range(0, len(prompts), 64):
                gen = sample(base, prompts[i:i + 64], self.sampling, torch.Generator().manual_seed(i),
                             policy="reference")
                for p, t, m in zip(prompts[i:i + 64], gen.tokens.cpu(), gen.mask.cpu()):
                    text = decode_bytes(t[m].tolist())
                    rows.append({"prompt": decode_bytes(p.tolist()), "response": text, "reward": self.judge(text)})
            write_jsonl(rows, path)
        return path

    def ilql(self, seed: int) -> list[tuple[float, dict]]:
        c = self.cfg
        torch.manual_seed(seed)
        model = ILQLModel(PaLM.load(self.init), lora=LoRAConfig(r=c.lora_r))
        cfg = ILQLConfig(steps=c.ilql_steps, batch_size=16, max_len=c.prompt_len + c.response_len, eval_prompts=0,
                         eval_interval=0, max_new_tokens=c.response_len, seed=seed, quiet=self.quiet,
                         checkpoint_interval=max(c.ilql_steps, 1),
                         checkpoint_dir=str(self.out / "runs" / f"ilql-s{seed}"))
        ILQLTrainer(model, str(self.ilql_data()), cfg).train()
        out = []
        for beta in c.ilql_betas:
            result = evaluate_ilql(model, self.eval_set, beta, cfg, torch.Generator().manual_seed(seed),
                                   gold_fn=self.judge, reward_fn=self.rm.score)
            result["samples"] = result["samples"][:SHOWN]
            out.append((beta, result))
        return out

    # ------------------------------------------------------------------------------------------------ the sweep

    def prepare(self) -> tuple[Path, Path, Path]:
        """What every run shares: the pairs, the reward model, the reference draw (best-of-N and the reference's
        level, which every gain is measured against) and ILQL's scored samples."""
        train, val = self.task()
        dpo_train = self.dpo_pairs(train)
        self.log(f"task ready: {len(load_preferences(train))} training pairs"
                 + (f", DPO's {len(load_preferences(dpo_train))} from {dpo_train}" if dpo_train != train else ""))
        self.rm = self.reward_model(train, val)
        self.log(f"reward model: held-out accuracy vs gold {self.rm_accuracy['val_gold_acc']:.1%}")
        self.best_of_n(self.rm)
        if "ilql" in self.cfg.methods and not self.report_only:
            self.ilql_data()
        return train, val, dpo_train

    def run(self) -> dict:
        c, t0 = self.cfg, time.time()
        train, val, dpo_train = self.prepare()
        if "best-of-n" not in c.methods:
            self.points = [p for p in self.points if p["method"] != "best-of-N" or p["setting"] == "N=1"]
            self.curves.pop("best-of-N")
        for seed in range(c.seeds):
            for beta in c.dpo_betas if "dpo" in c.methods else ():
                if run := self.cached(f"dpo-beta{beta}-s{seed}", ("dpo_",),
                                      lambda: self.dpo(dpo_train, val, beta, seed)):
                    self.add("DPO", f"beta={beta}", seed, run["result"], pair_acc=run["val_acc"])
                    for point in run.get("along", ()):
                        self.add("DPO, along training", f"beta={beta}, step {point['step']}", seed,
                                 point["result"], pair_acc=point["val_acc"])
            for algo in ("grpo", "rloo"):
                for coef in c.group_kl_coefs if algo in c.methods else ():
                    if result := self.cached(f"{algo}-kl{coef}-s{seed}", ("group_",),
                                             lambda: self.group(algo, coef, seed)):
                        self.add(algo.upper(), f"kl_coef={coef}", seed, result)
            if "ilql" in c.methods:
                for beta, result in self.cached(f"ilql-s{seed}", ("ilql_",), lambda: self.ilql(seed)) or ():
                    self.add("ILQL (offline)", f"beta={beta:g}", seed, result)
        for seed in range(c.seeds if c.ppo_seeds is None else c.ppo_seeds):
            for coef, budget in product(c.ppo_kl_coefs, c.ppo_kl_budgets) if "ppo" in c.methods else ():
                name = f"ppo-kl{coef}" + (f"-budget{budget:g}" if budget else "")
                if run := self.cached(f"{name}-s{seed}", ("ppo_",), lambda: self.ppo(
                        self.rm, coef, seed, c.ppo_steps, name, budget)):
                    self.add("PPO (reward model)", f"kl_coef={coef}" + (f", budget={budget:g}" if budget else ""),
                             seed, run["result"], steps=run.get("steps"))
            if "ppo-gold" in c.methods:
                if run := self.cached(f"ppo-gold-s{seed}", ("ppo_",), lambda: self.ppo(
                        None, c.ppo_kl_coefs[0], seed, c.ppo_steps, "ppo-gold")):
                    self.add("PPO (gold reward)", f"kl_coef={c.ppo_kl_coefs[0]}", seed, run["result"])
        if c.long_ppo_steps and "ppo" in c.methods:
            coef = min(c.ppo_kl_coefs)
            if run := self.cached(f"ppo-long-kl{coef}", ("ppo_", "long_ppo_"), lambda: self.ppo(
                    self.rm, coef, 0, c.long_ppo_steps, "ppo-long")):
                self.curves["PPO (long run, rollouts)"] = [
                    {"kl": r["kl"], "gold": r["gold_score"], "proxy": r["rm_score"]} for r in run["history"]]
        if self.missing:
            self.log(f"--report-only: {len(self.missing)} runs not done yet, left out: {', '.join(self.missing)}")
        report = {"config": asdict(c), "init": str(self.init), "reference": self.reference,
                  "reward_model": self.rm_accuracy, "points": self.points, "table": self.table(),
                  "curves": self.curves, "minutes": (time.time() - (self.started or t0)) / 60, "missing": self.missing,
                  "run_minutes": sum(x for x in self.run_seconds if x is not None) / 60,
                  "runs_without_time": sum(x is None for x in self.run_seconds)}
        atomic_write_text(json.dumps(report, indent=1), self.out / "frontier.json")
        atomic_write_text("\n".join(self.markdown(report)) + "\n", self.out / "frontier.md")
        self.plot()
        print("\n".join(self.markdown(report)))
        return report

    def table(self) -> list[dict]:
        """Mean and spread over seeds for each (method, setting); gold gain in reference standard deviations."""
        rows, sd = [], max(self.reference["gold_std"], 1e-9)
        for key in dict.fromkeys((p["method"], p["setting"]) for p in self.points):
            pts = [p for p in self.points if (p["method"], p["setting"]) == key]
            gold, gold_sd = mean_sd([p["gold"] for p in pts])
            kl, kl_sd = mean_sd([p["kl"] for p in pts])
            rows.append({"method": key[0], "setting": key[1], "seeds": len(pts), "gold": gold, "gold_seed_sd": gold_sd,
                         "gain_sd": (gold - self.reference["gold"]) / sd, "kl": kl, "kl_seed_sd": kl_sd})
        return rows

    def markdown(self, report: dict) -> list[str]:
        ref, rm = report["reference"], report["reward_model"]
        lines = [f"{len(self.eval_set)} held-out prompts; reference policy gold {ref['gold']:.3f} (sd "
                 f"{ref['gold_std']:.3f} over prompts); reward model held-out accuracy vs the gold judge "
                 f"{rm['val_gold_acc']:.1%}; the runs took {report['run_minutes']:.0f} minutes"
                 + (f" ({report['runs_without_time']} runs' times not recorded)" if report["runs_without_time"] else "")
                 + (f"; not run yet: {', '.join(report['missing'])}" if report["missing"] else "") + ".", "",
                 "| method | setting | seeds | gold score | gain (reference sd) | KL (nats/response) |",
                 "|---|---|---|---|---|---|"]
        for r in report["table"]:
            kl = f"{r['kl']:.2f} (bound)" if r["method"] == "best-of-N" else f"{r['kl']:.2f} ± {r['kl_seed_sd']:.2f}"
            lines.append(f"| {r['method']} | {r['setting']} | {r['seeds']} | {r['gold']:.3f} ± "
                         f"{r['gold_seed_sd']:.3f} | {r['gain_sd']:+.2f} | {kl} |")
        lines += ["", f"What each method writes (seed 0, the first {SHOWN} held-out prompts):", ""]
        prompts = [decode_bytes(p.tolist()) for p in self.eval_set[:SHOWN]]
        for p in self.points:
            if p["seed"] == 0 and p["samples"]:
                lines += [f"- {p['method']} {p['setting']}:"] + [f"  - `{json.dumps(q)[1:-1]}` -> "
                                                                 f"`{json.dumps(a)[1:-1]}`"
                                                                 for q, a in zip(prompts, p["samples"])]
        return lines

    def plot(self) -> None:
        plot_frontier(self.out / "frontier.png", self.points, self.curves)


def plot_frontier(path, points: list[dict], curves: dict[str, list[dict]]):
    """Gold score against KL for every method; reward-model (proxy) and gold scores against sqrt(KL) for best-of-N
    and the long PPO run (Gao et al. 2022's picture of over-optimisation)."""
    gold_kl, proxy, gold = "gold score vs KL to the reference", "reward model (proxy) vs sqrt(KL)", "gold vs sqrt(KL)"
    panels = {gold_kl: {}, proxy: {}, gold: {}}
    for method in dict.fromkeys(p["method"] for p in points):
        pts = sorted((p["kl"], p["gold"]) for p in points if p["method"] == method)
        panels[gold_kl][method] = ([x for x, _ in pts], [y for _, y in pts])
    for name, curve in curves.items():
        xs = [math.sqrt(max(r["kl"], 0.0)) for r in curve]
        panels[proxy][name] = (xs, [r["proxy"] for r in curve])
        panels[gold][name] = (xs, [r["gold"] for r in curve])
    return save_plot(path, panels, title="reward vs KL (nats per response)",
                     xlabel={gold_kl: "KL", proxy: "sqrt(KL)", gold: "sqrt(KL)"})


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--init", required=True, help="the pretrained (or SFT) checkpoint or model folder")
    parser.add_argument("--data", default="enwik6", help=f"prompt corpus: a file or {', '.join(DATASETS)}")
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--out", default="runs/frontier")
    parser.add_argument("--train", default=None, help="preference pairs to use instead of sampling them (with --val)")
    parser.add_argument("--val", default=None, help="held-out pairs (with --train)")
    parser.add_argument("--reward", default=None, help="a trained reward model to use instead of training one")
    parser.add_argument("--dpo-train", default=None, help="pairs DPO learns from (default: the task's sampled pairs "
                        "when it mixed in real text, else the reward model's)")
    parser.add_argument("--quick", action="store_true", help="a first look: " + ", ".join(
        f"{k}={v}" for k, v in QUICK.items()))
    parser.add_argument("--verbose", action="store_true", help="progress bars of every run")
    parser.add_argument("--report-only", action="store_true", help="run nothing: the table, plot and files from the "
                        "runs already done in --out (the others are listed as missing)")
    parser.add_argument("--workers", type=int, default=1, help="processes sharing the sweep (the torch threads "
                        "split between them): on a 2-core CPU 2 runs two single-threaded runs at a time")
    parser.add_argument("--claim", action="store_true", help=argparse.SUPPRESS)   # a worker of --workers
    for f in fields(FrontierConfig):
        kind = int if f.default is None else type(f.default)
        if f.name == "methods":
            parser.add_argument("--methods", nargs="+", choices=METHODS, default=None, help=f.metadata["help"])
        elif kind is bool:
            parser.add_argument("--" + f.name.replace("_", "-"), action=argparse.BooleanOptionalAction, default=None,
                                help=f.metadata["help"])
        elif kind is tuple:
            parser.add_argument("--" + f.name.replace("_", "-"), type=float if "kl" in f.name or "beta" in f.name
                                else int, nargs="+", default=None, help=f.metadata["help"])
        else:
            parser.add_argument("--" + f.name.replace("_", "-"), type=kind, default=None, help=f.metadata["help"])
    args = parser.parse_args(argv)
    cfg = replace(FrontierConfig(), **(QUICK if args.quick else {}))
    cfg = replace(cfg, **{f.name: tuple(v) if isinstance(v, list) else v for f in fields(FrontierConfig)
                          if (v := getattr(args, f.name)) is not None})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if (args.train is None) != (args.val is None):
        parser.error("--train and --val go together")
    if args.workers < 1:
        parser.error("--workers must be >= 1")
    started = time.time()
    corpus = load_corpus(args.data, data_dir=args.data_dir)
    frontier = lambda **kw: Frontier(  # noqa: E731
        args.init, corpus, out, cfg, quiet=not args.verbose,
        pairs=(args.train, args.val) if args.train else None, reward=args.reward, dpo_pairs=args.dpo_train, **kw)
    if args.workers == 1 or args.report_only or args.claim:
        return frontier(report_only=args.report_only, claim=args.claim).run()
    frontier().prepare()   # what every run shares, once, before the workers start
    run_workers(out, [a for a in (sys.argv[1:] if argv is None else argv)], args.workers)
    return frontier(report_only=True, started=started).run()


def run_workers(out: Path, argv: list[str], n: int) -> None:
    """n processes of this command (less --workers) claim the sweep's runs one at a time; logs in out/worker-I.log."""
    argv = [a for i, a in enumerate(argv) if not (a.startswith("--workers") or i and argv[i - 1] == "--workers")]
    argv.append("--claim")
    for stale in (out / "points").glob("*.claim"):   # claims of a sweep that was killed
        stale.unlink()
    threads = str(max(1, (os.cpu_count() or 1) // n))
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", threads)}
    procs = []
    for w in range(n):
        with open(out / f"worker-{w}.log", "w") as log:
            procs.append(subprocess.Popen([sys.executable, "-m", "palm_rlhf.frontier", *argv], stdout=log,
                                          stderr=subprocess.STDOUT, env=env))
    print(f"[frontier] {n} workers ({threads} thread(s) each); logs in {out}/worker-*.log", flush=True)
    try:
        codes = [p.wait() for p in procs]
    except KeyboardInterrupt:
        for p in procs:
            p.terminate()
        raise
    for w, code in enumerate(codes):
        if code:
            print(f"[frontier] worker {w} failed (exit {code}): see {out}/worker-{w}.log; its runs are missing below "
                  "and the same command runs them again", flush=True)


if __name__ == "__main__":
    main()
