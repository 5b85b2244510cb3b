"""Train PaLM on enwik8 (bytes) and report bits per character; later RLHF stages run from the same CLI.

    python train.py                       # pretrain the "cpu" preset on enwik8 (downloaded if missing)
    python train.py pretrain --data FILE  # any text file, raw or .gz
    python train.py STAGE --help          # every option of a stage

Several GPUs (or CPU processes): `accelerate launch train.py ...` or `torchrun --nproc_per_node N train.py ...`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import fields
from pathlib import Path

import torch
from tqdm import tqdm

from palm_rlhf.data import decode_bytes, encode_text, load_corpus, random_windows, split_corpus
from palm_rlhf.demo import build_demonstrations, build_preferences, gold_score, gold_scores, prompt_windows
from palm_rlhf.feedback import (collate, encode_all, load_demonstrations, load_preferences, load_prompts_file,
                                load_ratings)
from palm_rlhf.lora import add_lora, merge_lora, set_lora
from palm_rlhf.palm import PRESETS, PaLM, PaLMConfig, next_token_loss
from palm_rlhf.ppo import ActorCritic, PPOConfig, PPOTrainer
from palm_rlhf.reward import (RewardModel, bradley_terry_loss, load_reward_model, pairwise_accuracy,
                              rating_bins_loss, regression_loss)
from palm_rlhf.sampling import generate
from palm_rlhf.training import (MetricsLog, finish, load_checkpoint, load_model, make_accelerator, make_optimizer,
                                replica_fingerprints, restore, run_training, save_checkpoint, save_plot,
                                step_generator, step_seed)
from palm_rlhf.utils import bits_per_char, write_jsonl

STAGES = ("pretrain", "make-preferences", "sft", "reward", "ppo")


def parse_overrides(pairs: list[str]) -> dict:
    """["dim=128", "qk_norm=true"] -> {"dim": 128, "qk_norm": True}, typed like PaLMConfig's fields."""
    types = {f.name: f.type for f in fields(PaLMConfig)}
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"--model expects KEY=VALUE, got {pair!r}")
        key, value = pair.split("=", 1)
        if key not in types:
            raise ValueError(f"--model {key}: not a PaLMConfig field; fields are {sorted(types)}")
        kind = types[key] if isinstance(types[key], str) else types[key].__name__
        if kind == "bool":
            out[key] = value.lower() in ("1", "true", "yes")
        elif kind == "int":
            out[key] = int(value)
        elif kind == "float":
            out[key] = float(value)
        else:
            out[key] = value
    return out


def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=2000, help="optimizer steps in total")
    p.add_argument("--stop-after", type=int, default=None,
                   help="stop after this many steps in this run (checkpoint saved); resume later with --resume")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per micro-batch per process")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine decay ends at lr * this")
    p.add_argument("--warmup", type=int, default=100, help="linear warm-up steps")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0 = off)")
    p.add_argument("--eval-interval", type=int, default=200)
    p.add_argument("--checkpoint-dir", default="checkpoints/pretrain")
    p.add_argument("--checkpoint-interval", type=int, default=500)
    p.add_argument("--resume", default=None, help="checkpoint to resume from ('auto' = CHECKPOINT_DIR/last.pt if any)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16"])
    p.add_argument("--cpu", action="store_true", help="run on CPU even when a GPU is present")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="stage")
    p = sub.add_parser("pretrain", help="next-byte pretraining, reports validation bits per character")
    p.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    p.add_argument("--model", nargs="*", default=[], metavar="KEY=VALUE", help="override preset fields")
    p.add_argument("--data", default=None, help="training text (raw/.gz/.zip); default: enwik8, downloaded")
    p.add_argument("--download-to", default="data/enwik8.gz", help="where enwik8 is stored when --data is not given")
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--eval-batches", type=int, default=40, help="validation batches per evaluation")
    p.add_argument("--sample-interval", type=int, default=500, help="print a KV-cached sample every N steps (0 = off)")
    p.add_argument("--sample-tokens", type=int, default=128)
    add_common_args(p)

    p = sub.add_parser("make-preferences", help="the demo task: sample pairs from a model, label them with the "
                                                 "gold judge (noisy), write train/val JSONL and SFT demonstrations")
    p.add_argument("--init", required=True, help="pretrained checkpoint that writes the responses")
    p.add_argument("--data", default=None, help="corpus for prompts (default: enwik8, downloaded)")
    p.add_argument("--download-to", default="data/enwik8.gz")
    p.add_argument("--out", default="data/demo", help="folder for train.jsonl, val.jsonl, demos.jsonl, stats.json")
    p.add_argument("--pairs", type=int, default=3000)
    p.add_argument("--val-pairs", type=int, default=400)
    p.add_argument("--demos", type=int, default=2000, help="SFT demonstrations to write (clean real continuations)")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--response-len", type=int, default=64)
    p.add_argument("--flip", type=float, default=0.1, help="fraction of labels flipped (noisy labellers)")
    p.add_argument("--min-gap", type=float, default=0.05, help="gold-score gap below which a pair is a tie (skipped)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cpu", action="store_true")
    p.add_argument("--quiet", action="store_true")

    for name, helptext in (("sft", "supervised fine-tuning on demonstrations (loss on response tokens only)"),
                           ("reward", "reward model from preferences (Bradley-Terry), ratings (bins) or regression")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--init", required=True, help="checkpoint of the model to start from (pretrain or sft)")
        p.add_argument("--train", required=True, help="JSONL file (see palm_rlhf/feedback.py for the formats)")
        p.add_argument("--val", default=None, help="held-out JSONL; default: the last --val-fraction of --train")
        p.add_argument("--val-fraction", type=float, default=0.1)
        p.add_argument("--max-len", type=int, default=256, help="prompt + response tokens; longer responses are cut")
        p.add_argument("--lora-r", type=int, default=8, help="LoRA rank (0 = fine-tune every weight)")
        p.add_argument("--lora-alpha", type=float, default=16.0)
        p.add_argument("--eval-batches", type=int, default=0, help="0 = the whole held-out set")
        if name == "reward":
            p.add_argument("--objective", default="pairwise", choices=["pairwise", "bins", "regression"])
            p.add_argument("--num-bins", type=int, default=5, help="rating bins (objective bins): ratings 0..n-1")
            p.add_argument("--margin", type=float, default=0.0, help="Bradley-Terry margin")
            p.add_argument("--gold", action="store_true", help="also report accuracy against the demo gold judge")
        add_common_args(p)
        p.set_defaults(checkpoint_dir=f"checkpoints/{name}", steps=300, lr=3e-4, warmup=20, eval_interval=50,
                       batch_size=16, checkpoint_interval=100, weight_decay=0.0)

    p = sub.add_parser("ppo", help="RLHF: PPO against a frozen reward model, KL-penalised to the reference policy",
                       epilog="--max-grad-norm 0, --reward-clip 0 and --early-stop-kl 0 switch those off.")
    p.add_argument("--init", required=True, help="policy checkpoint (pretrain or sft): actor, reference and critic")
    p.add_argument("--reward", required=True, help="reward-model checkpoint (train.py reward)")
    p.add_argument("--prompts", default=None, help='JSONL of {"prompt": ...}; default: windows of --data')
    p.add_argument("--data", default=None, help="corpus for prompt windows (default: enwik8, downloaded)")
    p.add_argument("--download-to", default="data/enwik8.gz")
    p.add_argument("--prompt-len", type=int, default=32, help="window length when prompts come from --data")
    p.add_argument("--iterations", type=int, default=100)
    p.add_argument("--stop-after", type=int, default=None, help="stop after this many iterations in this run")
    p.add_argument("--lora-r", type=int, default=8, help="LoRA rank of actor and critic (0 = full fine-tuning)")
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--critic-from-reward", action="store_true", help="initialise the value head (and adapter) "
                                                                     "from the reward model, as InstructGPT does")
    p.add_argument("--eval-prompts", type=int, default=256, help="held-out prompts for the before/after table")
    p.add_argument("--best-of", type=int, default=8, help="N of the best-of-N baseline (0 = skip)")
    p.add_argument("--gold", action="store_true", help="report the demo task's gold judge too")
    p.add_argument("--checkpoint-dir", default="checkpoints/ppo")
    p.add_argument("--checkpoint-interval", type=int, default=10)
    p.add_argument("--resume", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16"])
    p.add_argument("--log-with", default=None, help="accelerate tracker, e.g. tensorboard or wandb")
    p.add_argument("--cpu", action="store_true")
    p.add_argument("--quiet", action="store_true")
    for f in fields(PPOConfig):
        if f.name == "eos_token":
            p.add_argument("--eos-token", type=int, default=None)
        elif f.type in ("bool", bool):
            p.add_argument(f"--{f.name.replace('_', '-')}", type=lambda v: v.lower() in ("1", "true", "yes"),
                           default=f.default, metavar="BOOL")
        else:
            kind = {"int": int, "float": float, "int | None": int, "float | None": float}[str(f.type)]
            p.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=f.default)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in STAGES and argv[0] not in ("-h", "--help"):
        argv = ["pretrain", *argv]
    return build_parser().parse_args(argv)


@torch.no_grad()
def evaluate_bpc(model, val: torch.Tensor, *, batches: int, batch_size: int, seq_len: int, rank: int,
                 accelerator) -> float:
    """Mean validation loss in bits per character over fixed windows (the same windows at every evaluation)."""
    model.eval()
    total, count = torch.zeros((), device=accelerator.device), 0
    for i in range(batches):
        x = random_windows(val, batch_size, seq_len, step_generator(1234, i, rank=rank)).to(accelerator.device)
        with accelerator.autocast():
            total += next_token_loss(model(x[:, :-1]), x[:, 1:]).float()
        count += 1
    model.train()
    mean = accelerator.reduce(total / count, reduction="mean")
    return bits_per_char(float(mean))


def resume_state(args, stage: str):
    """The checkpoint to resume from (--resume PATH or 'auto'), or None."""
    resume = args.resume
    if resume == "auto":
        last = Path(args.checkpoint_dir) / "last.pt"
        resume = last if last.is_file() else None
    return (load_checkpoint(resume, stage=stage), resume) if resume else (None, None)


def pretrain(args: argparse.Namespace) -> dict:
    accelerator = make_accelerator(args.mixed_precision, args.cpu)
    rank, main = accelerator.process_index, accelerator.is_main_process
    state, resume = resume_state(args, "pretrain")
    config = (PaLMConfig.from_dict(state["config"]) if state
              else PaLMConfig.preset(args.preset, **parse_overrides(args.model)))
    if args.seq_len > config.max_seq_len:
        raise ValueError(f"--seq-len {args.seq_len} exceeds the model's max_seq_len {config.max_seq_len}")
    data = load_corpus(args.data, download_to=args.download_to)
    train_data, val_data = split_corpus(data, args.val_fraction)

    torch.manual_seed(args.seed)
    model = PaLM(config)
    optimizer = make_optimizer(model, args.lr, args.weight_decay)
    start = restore(state, model, optimizer)
    model, optimizer = accelerator.prepare(model, optimizer)
    raw_model = accelerator.unwrap_model(model)
    if main:
        print(f"PaLM {config.dim}d x {config.depth} layers, {raw_model.num_params() / 1e6:.2f}M params | "
              f"{len(train_data):,} train / {len(val_data):,} val bytes | {accelerator.num_processes} process(es) "
              f"on {accelerator.device} | steps {start}->{args.steps}" + (f" (resumed from {resume})" if resume else ""))

    def loss_fn(step, micro):
        x = random_windows(train_data, args.batch_size, args.seq_len, step_generator(args.seed, step, micro, rank))
        x = x.to(accelerator.device)
        loss = next_token_loss(model(x[:, :-1]), x[:, 1:])
        return loss, {"bpc": bits_per_char(loss.item())}

    def eval_fn(step):
        return {"val_bpc": evaluate_bpc(model, val_data, batches=args.eval_batches, batch_size=args.batch_size,
                                        seq_len=args.seq_len, rank=rank, accelerator=accelerator)}

    def after_step(done):
        if args.sample_interval and done % args.sample_interval == 0 and main:
            prompt = val_data[:64].long().to(accelerator.device)
            out = generate(raw_model, [prompt], args.sample_tokens, temperature=0.8, top_k=32,
                           generator=step_generator(args.seed, done))
            tqdm.write(f"--- sample at step {done} ---\n{decode_bytes(prompt)}|>>>|{decode_bytes(out.tokens[0])}\n---")

    summary = run_training(accelerator, model, optimizer, args=args, stage="pretrain", config=config, start=start,
                           loss_fn=loss_fn, eval_fn=eval_fn, after_step=after_step)
    tokens = args.batch_size * args.grad_accum * args.seq_len * accelerator.num_processes * summary["steps_run"]
    summary["tokens_per_s"] = round(tokens / max(summary["seconds"], 1e-9))
    return finish(accelerator, summary, args.checkpoint_dir,
                  plots={"bits per character": {"train": "bpc", "validation": "val_bpc"}},
                  lines=[f"{summary['tokens_per_s']:,} tokens/s; final train loss {summary['final_train_loss']:.4f} "
                         f"nats; validation {summary.get('val_bpc', float('nan')):.4f} bits per char"])


def make_preferences(args: argparse.Namespace) -> dict:
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    model = load_model(args.init).to(device).eval()
    corpus = load_corpus(args.data, download_to=args.download_to)
    out = Path(args.out)
    total = args.pairs + args.val_pairs
    pairs, stats = build_preferences(model, corpus, pairs=total, prompt_len=args.prompt_len,
                                     response_len=args.response_len, flip=args.flip, min_gap=args.min_gap,
                                     batch=args.batch_size, seed=args.seed, quiet=args.quiet)
    write_jsonl(pairs[:args.pairs], out / "train.jsonl")
    write_jsonl(pairs[args.pairs:], out / "val.jsonl")
    demos = build_demonstrations(corpus, count=args.demos, prompt_len=args.prompt_len,
                                 response_len=args.response_len, seed=args.seed)
    write_jsonl(demos, out / "demos.jsonl")
    stats.update(train=args.pairs, val=args.val_pairs, demos=len(demos))
    (out / "stats.json").write_text(json.dumps(stats, indent=1))
    print(f"wrote {args.pairs} training and {args.val_pairs} held-out pairs, {len(demos)} demonstrations to {out}; "
          f"{stats['ties_skipped']} ties skipped, {stats['labels_flipped']} labels flipped ({stats['flip_rate']:.1%})")
    return stats


def split_examples(args, loader):
    train = loader(args.train)
    if args.val:
        return train, loader(args.val)
    n_val = max(1, int(len(train) * args.val_fraction))
    if n_val >= len(train):
        raise ValueError(f"{args.train} holds {len(train)} examples: too few to hold out {n_val}; pass --val")
    return train[:-n_val], train[-n_val:]


def encode_or_fail(args, examples, keys, what):
    encoded, dropped = encode_all(examples, keys, args.max_len)
    if not encoded:
        raise ValueError(f"every {what} example is longer than --max-len {args.max_len} in its prompt alone")
    if dropped:
        print(f"{what}: dropped {dropped} of {len(examples)} examples whose prompt alone reaches --max-len")
    return encoded


def batches(items, size):
    for i in range(0, len(items), size):
        yield items[i:i + size]


def feedback_stage(args, stage: str, loader, keys):
    """What SFT and reward modelling share: accelerator, resume state, the --init model, encoded examples."""
    accelerator = make_accelerator(args.mixed_precision, args.cpu)
    state, _ = resume_state(args, stage)
    torch.manual_seed(args.seed)  # LoRA initialisation
    model = load_model(args.init)
    train_ex, val_ex = split_examples(args, loader)
    train_enc = encode_or_fail(args, train_ex, keys, "training")
    val_enc = encode_or_fail(args, val_ex, keys, "held-out")
    return accelerator, state, model, val_ex, train_enc, val_enc


def sft(args: argparse.Namespace) -> dict:
    accelerator, state, model, _, train_enc, val_enc = feedback_stage(args, "sft", load_demonstrations, ("response",))
    rank, device, config = accelerator.process_index, accelerator.device, model.config
    if args.lora_r > 0:
        params = add_lora(model, "sft", r=args.lora_r, alpha=args.lora_alpha)
        set_lora(model, "sft")
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
    else:
        params = list(model.parameters())
    optimizer = make_optimizer(model, args.lr, args.weight_decay)
    start = restore(state, model, optimizer)
    model, optimizer = accelerator.prepare(model, optimizer)
    raw = accelerator.unwrap_model(model)

    def response_loss(items):
        b = {k: v.to(device) for k, v in collate([e[0] for e in items]).items()}
        logits = model(b["tokens"][:, :-1], mask=b["mask"][:, :-1])
        return next_token_loss(logits, b["tokens"][:, 1:], b["response_mask"][:, 1:])

    def loss_fn(step, micro):
        idx = torch.randint(len(train_enc), (args.batch_size,), generator=step_generator(args.seed, step, micro, rank))
        return response_loss([train_enc[i] for i in idx.tolist()]), {}

    @torch.no_grad()
    def eval_fn(step):
        model.eval()
        losses = [response_loss(chunk).item() for chunk in batches(val_enc, args.batch_size)]
        model.train()
        loss = sum(losses) / len(losses)
        return {"val_loss": loss, "val_bpc": bits_per_char(loss)}

    summary = run_training(accelerator, model, optimizer, args=args, stage="sft", config=config, start=start,
                           loss_fn=loss_fn, eval_fn=eval_fn, params=params)
    if accelerator.is_main_process:  # a plain PaLM (adapter merged) for the next stages' --init
        if args.lora_r > 0:
            merge_lora(raw, "sft")
        save_checkpoint(Path(args.checkpoint_dir) / "final.pt", model=raw, optimizer=None, step=summary["final_step"],
                        config=config, stage="sft", args=vars(args))
    return finish(accelerator, summary, args.checkpoint_dir, plots={"response loss (nats)": {
        "train": "loss", "held-out": "val_loss"}}, lines=[
        f"held-out response loss {summary.get('val_loss', float('nan')):.4f} nats "
        f"({summary.get('val_bpc', float('nan')):.4f} bits/byte); merged model for --init: "
        f"{Path(args.checkpoint_dir) / 'final.pt'}"])


def reward(args: argparse.Namespace) -> dict:
    pairwise = args.objective == "pairwise"
    accelerator, state, palm, val_ex, train_enc, val_enc = feedback_stage(
        args, "reward", load_preferences if pairwise else load_ratings,
        ("chosen", "rejected") if pairwise else ("response",))
    rank, device, config = accelerator.process_index, accelerator.device, palm.config
    rm = RewardModel(palm, lora_r=args.lora_r, lora_alpha=args.lora_alpha,
                     num_bins=args.num_bins if args.objective == "bins" else None)
    rm.freeze_base()
    params = rm.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    start = restore(state, rm, optimizer)
    model, optimizer = accelerator.prepare(rm, optimizer)

    def forward(items):
        """-> loss, scores (pairwise: chosen, rejected)"""
        flat = [e for pair in items for e in pair]
        b = {k: v.to(device) for k, v in collate(flat).items()}
        out = model(b["tokens"], b["mask"], b["response_mask"])
        if pairwise:
            chosen, rejected = out[0::2], out[1::2]
            return bradley_terry_loss(chosen, rejected, args.margin), (chosen, rejected)
        target = torch.tensor([e[0].rating for e in items], device=device)
        if args.objective == "bins":
            return rating_bins_loss(out, target.round().clamp(0, args.num_bins - 1)), (out,)
        return regression_loss(out, target), (out,)

    def loss_fn(step, micro):
        idx = torch.randint(len(train_enc), (args.batch_size,), generator=step_generator(args.seed, step, micro, rank))
        loss, scores = forward([train_enc[i] for i in idx.tolist()])
        return loss, ({"acc": pairwise_accuracy(*scores)} if pairwise else {})

    gold_labels = None
    if args.gold and pairwise:  # which response the gold judge prefers, for each held-out pair
        gold_labels = torch.tensor([gold_score(ex["chosen"]) > gold_score(ex["rejected"]) for ex in val_ex])

    @torch.no_grad()
    def eval_fn(step):
        model.eval()
        losses, chosen, rejected = [], [], []
        for chunk in batches(val_enc, args.batch_size):
            loss, scores = forward(chunk)
            losses.append(loss.item() * len(chunk))
            if pairwise:
                chosen.append(scores[0].float().cpu())
                rejected.append(scores[1].float().cpu())
        model.train()
        out = {"val_loss": sum(losses) / len(val_enc)}
        if pairwise:
            c, r = torch.cat(chosen), torch.cat(rejected)
            out["val_acc"] = pairwise_accuracy(c, r)
            if gold_labels is not None:
                out["val_gold_acc"] = ((c > r) == gold_labels).float().mean().item()
        return out

    extra = lambda: {"kind": "reward", "lora_r": args.lora_r, "lora_alpha": args.lora_alpha,  # noqa: E731
                     "objective": args.objective, "num_bins": args.num_bins if args.objective == "bins" else None}
    summary = run_training(accelerator, model, optimizer, args=args, stage="reward", config=config, start=start,
                           loss_fn=loss_fn, eval_fn=eval_fn, extra_state=extra, params=params)
    lines = [f"held-out loss {summary.get('val_loss', float('nan')):.4f}"]
    if pairwise:
        lines.append(f"held-out pairwise accuracy vs the labels: {summary.get('val_acc', float('nan')):.1%}")
    if gold_labels is not None:
        ceiling = gold_labels.float().mean().item()
        summary["gold_label_agreement"] = ceiling
        lines.append(f"held-out accuracy vs the gold judge: {summary['val_gold_acc']:.1%} "
                     f"(the gold judge itself agrees with the noisy labels on {ceiling:.1%}: the ceiling)")
    return finish(accelerator, summary, args.checkpoint_dir, plots={
        "loss": {"train": "loss", "held-out": "val_loss"},
        "pairwise accuracy": {"train batch": "acc", "held-out": "val_acc", "held-out vs gold": "val_gold_acc"}}
        if pairwise else {"loss": {"train": "loss", "held-out": "val_loss"}}, lines=lines)


def draw_prompts(args, count: int, seed: int, corpus=None, rows=None) -> list[torch.Tensor]:
    """`count` prompts: drawn from the --prompts rows or windows of the corpus, as a function of `seed` alone."""
    if rows is not None:
        g = torch.Generator().manual_seed(seed)
        return [encode_text(rows[i]) for i in torch.randint(len(rows), (count,), generator=g).tolist()]
    return prompt_windows(corpus, count, args.prompt_len, seed)


def gold_gain(before: dict, after: dict) -> tuple[float, float]:
    """Gold-score change in standard deviations of the pre-PPO scores, and its standard error over the held-out
    prompts (both policies answer the same prompts, so the error is that of the mean per-prompt difference)."""
    sd = max(before["gold_score_std"], 1e-9)
    stderr = float("nan")  # stays nan when a run resumed from an older checkpoint did not record the scores
    if "gold_per_prompt" in before and len(before["gold_per_prompt"]) > 1:
        diff = torch.tensor(after["gold_per_prompt"]) - torch.tensor(before["gold_per_prompt"])
        stderr = diff.std().item() / len(diff) ** 0.5
    return (after["gold_score"] - before["gold_score"]) / sd, stderr / sd


def ppo_plot(path, log: MetricsLog, before: dict, cfg: PPOConfig):
    """Reward-model score, KL (with its target) and, with a gold judge, the gold score with the reference's
    held-out level and that level plus one standard deviation."""
    steps = log.series("kl")[0]
    level = lambda value: (steps, [value] * len(steps))  # noqa: E731
    panels = {"reward-model score": {"rollouts": log.series("rm_score")}, "KL to reference (nats/response)":
              {"rollouts": log.series("kl"), **({"target": level(cfg.target_kl)} if cfg.adaptive_kl else {})}}
    if "gold_score" in before:
        panels["gold score"] = {"rollouts": log.series("gold_score"),
                                "reference (held-out)": level(before["gold_score"]),
                                "reference + 1 sd": level(before["gold_score"] + before["gold_score_std"])}
    return save_plot(path, panels, title="PPO")


def ppo(args: argparse.Namespace) -> dict:
    if args.eval_prompts < 2:
        raise ValueError(f"--eval-prompts {args.eval_prompts}: the before/after table needs at least 2 held-out "
                         f"prompts (it reports a standard deviation over them); 64 or more give a usable estimate")
    accelerator = make_accelerator(args.mixed_precision, args.cpu, log_with=args.log_with,
                                   project_dir=args.checkpoint_dir)
    main_process = accelerator.is_main_process
    cfg = PPOConfig(**{f.name: getattr(args, f.name) for f in fields(PPOConfig)})
    state, resume = resume_state(args, "ppo")
    torch.manual_seed(args.seed)
    actor_critic = ActorCritic(load_model(args.init), lora_r=args.lora_r, lora_alpha=args.lora_alpha)
    reward_model = load_reward_model(args.reward)
    if args.critic_from_reward:
        actor_critic.init_critic_from_reward(reward_model)
    corpus = None if args.prompts else load_corpus(args.data, download_to=args.download_to)
    rows = load_prompts_file(args.prompts) if args.prompts else None
    gold = gold_scores if args.gold else None
    trainer = PPOTrainer(actor_critic, reward_model, cfg, accelerator=accelerator, lr=args.lr, seed=args.seed,
                         gold_fn=gold)
    if state:
        accelerator.unwrap_model(trainer.model).load_state_dict(state["model"])
        trainer.optimizer.load_state_dict(state["optimizer"])
        trainer.load_state_dict(state["extra"]["trainer"])
    if args.log_with:
        accelerator.init_trackers("palm-rlhf-ppo", config={k: v for k, v in vars(args).items()
                                                           if isinstance(v, (int, float, str, bool))})
    eval_prompts = draw_prompts(args, args.eval_prompts, seed=10_000 + args.seed, corpus=corpus, rows=rows)
    ckpt_dir = Path(args.checkpoint_dir)
    before = trainer.evaluate(eval_prompts, actor=False) if not state else state["extra"]["before"]
    start = trainer.iteration
    log = MetricsLog(ckpt_dir / "metrics.jsonl" if main_process else None, start=start)
    end = args.iterations if args.stop_after is None else min(args.iterations, start + args.stop_after)
    if main_process:
        print(f"PPO: {cfg.prompts_per_iter} prompts x {cfg.max_new_tokens} new tokens per iteration per process, "
              f"{accelerator.num_processes} process(es), iterations {start}->{end}, "
              f"{'LoRA r=' + str(args.lora_r) if args.lora_r else 'full fine-tuning'}")
    bar = tqdm(range(start, end), initial=start, total=end, desc="ppo", disable=not main_process or args.quiet)

    def checkpoint():
        if main_process:
            save_checkpoint(ckpt_dir / "last.pt", model=accelerator.unwrap_model(trainer.model),
                            optimizer=trainer.optimizer, step=trainer.iteration, config=actor_critic.palm.config,
                            stage="ppo", args=vars(args), extra={"trainer": trainer.state_dict(), "before": before,
                                                                  "lora_r": args.lora_r, "lora_alpha": args.lora_alpha})
        accelerator.wait_for_everyone()

    history = []
    try:
        for it in bar:
            prompts = draw_prompts(args, cfg.prompts_per_iter, seed=step_seed(args.seed, it, accelerator.process_index),
                                   corpus=corpus, rows=rows)
            stats = trainer.step(prompts)
            history.append(stats)
            log.write(step=stats["iteration"], **stats)
            if args.log_with:
                accelerator.log({k: v for k, v in stats.items() if isinstance(v, (int, float))}, step=it + 1)
            bar.set_postfix(rm=f"{stats['rm_score']:.3f}", kl=f"{stats['kl']:.2f}", beta=f"{stats['beta']:.3f}",
                            **({"gold": f"{stats['gold_score']:.3f}"} if "gold_score" in stats else {}))
            if trainer.iteration % args.checkpoint_interval == 0 or trainer.iteration == end:
                checkpoint()
    except KeyboardInterrupt:
        if main_process:
            print(f"\ninterrupted; the last checkpoint in {ckpt_dir} is intact (resume with --resume auto)")
        raise
    bar.close()
    fingerprints = replica_fingerprints(accelerator, trainer.model, "PPO")
    after = trainer.evaluate(eval_prompts, actor=True)
    results = {"reference policy (before PPO)": before, "PPO policy (after)": after}
    if args.best_of > 1:
        results[f"best-of-{args.best_of} (reference policy + reward model)"] = trainer.evaluate(
            eval_prompts, actor=False, best_of=args.best_of)
    summary = {"stage": "ppo", "iterations": trainer.iteration, "results": results, "history": history,
               "target_kl": cfg.target_kl, "checkpoint": str(ckpt_dir / "last.pt"), "processes":
               accelerator.num_processes, "distributed_type": str(accelerator.distributed_type),
               "replica_fingerprints": fingerprints}
    if main_process and trainer.iteration == args.iterations:
        if args.gold:
            summary["gold_gain_in_std"], summary["gold_gain_stderr"] = gold_gain(before, after)
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        (ckpt_dir / "eval.json").write_text(json.dumps(summary, indent=1))
        ppo_plot(ckpt_dir / "ppo.png", log, before, cfg)
        print(f"\n=== PPO on {len(eval_prompts)} held-out prompts ===")
        keys = ["rm_score", "gold_score", "kl"] if args.gold else ["rm_score", "kl"]
        print(f"| policy | {' | '.join(keys)} |")
        print("|---" * (len(keys) + 1) + "|")
        for name, r in results.items():
            cells = [f"{r[k]:.3f} ± {r[k + '_std']:.3f}" if k + "_std" in r else
                     f"{r.get(k, r.get('kl_bound', float('nan'))):.3f}" + (" (bound)" if k == "kl" and "kl_bound" in r else "")
                     for k in keys]
            print(f"| {name} | {' | '.join(cells)} |")
        if args.gold:
            print(f"gold score change: {summary['gold_gain_in_std']:+.2f} +- {summary['gold_gain_stderr']:.2f} "
                  f"(standard error over prompts) standard deviations of the pre-PPO distribution; "
                  f"KL to reference {after['kl']:.2f} nats (target {cfg.target_kl})")
        print(f"replicas in sync: True ({len(fingerprints)} fingerprint(s))")
        print(f"curves: {ckpt_dir / 'ppo.png'}, per-iteration log: {ckpt_dir / 'metrics.jsonl'}")
    accelerator.end_training()
    return summary


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    stages = {"pretrain": pretrain, "make-preferences": make_preferences, "sft": sft, "reward": reward, "ppo": ppo}
    return stages[args.stage](args)


if __name__ == "__main__":
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    try:
        main()
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.stdout.flush()
        os._exit(2) if distributed else sys.exit(2)
    if distributed:
        # gloo worker threads can abort the interpreter at shutdown (SIGABRT); all work is done and saved here
        sys.stdout.flush(); sys.stderr.flush()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        os._exit(0)
