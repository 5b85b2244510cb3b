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
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from tqdm import tqdm

from palm_rlhf.data import decode_bytes, load_corpus, random_windows, split_corpus
from palm_rlhf.palm import PRESETS, PaLM, PaLMConfig, next_token_loss
from palm_rlhf.sampling import generate
from palm_rlhf.training import (MetricsLog, load_checkpoint, lr_at, make_accelerator, make_optimizer,
                                params_fingerprint, save_checkpoint, save_plot, step_generator)
from palm_rlhf.utils import bits_per_char, exists

STAGES = ("pretrain",)


def parse_overrides(pairs: list[str]) -> dict:
    """["dim=128", "qk_norm=true"] -> {"dim": 128, "qk_norm": True}, typed like PaLMConfig's fields."""
    from dataclasses import fields
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


def pretrain(args: argparse.Namespace) -> dict:
    accelerator = make_accelerator(args.mixed_precision, args.cpu)
    rank, main = accelerator.process_index, accelerator.is_main_process
    ckpt_dir = Path(args.checkpoint_dir)
    resume = args.resume
    if resume == "auto":
        resume = ckpt_dir / "last.pt" if (ckpt_dir / "last.pt").is_file() else None

    state = load_checkpoint(resume, stage="pretrain") if resume else None
    config = (PaLMConfig.from_dict(state["config"]) if state
              else PaLMConfig.preset(args.preset, **parse_overrides(args.model)))
    if args.seq_len > config.max_seq_len:
        raise ValueError(f"--seq-len {args.seq_len} exceeds the model's max_seq_len {config.max_seq_len}")

    data = load_corpus(args.data, download_to=args.download_to)
    train_data, val_data = split_corpus(data, args.val_fraction)

    torch.manual_seed(args.seed)
    model = PaLM(config)
    optimizer = make_optimizer(model, args.lr, args.weight_decay)
    start = 0
    if state:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        start = state["step"]
    model, optimizer = accelerator.prepare(model, optimizer)
    raw_model = accelerator.unwrap_model(model)

    log = MetricsLog(ckpt_dir / "metrics.jsonl" if main else None)
    if main:
        print(f"PaLM {config.dim}d x {config.depth} layers, {raw_model.num_params() / 1e6:.2f}M params | "
              f"{len(train_data):,} train / {len(val_data):,} val bytes | {accelerator.num_processes} process(es) "
              f"on {accelerator.device} | steps {start}->{args.steps}" + (f" (resumed from {resume})" if resume else ""))

    end = args.steps if args.stop_after is None else min(args.steps, start + args.stop_after)
    tokens_per_step = args.batch_size * args.grad_accum * args.seq_len * accelerator.num_processes
    bar = tqdm(range(start, end), initial=start, total=end, disable=not main or args.quiet, desc="pretrain")
    t0, losses, val_bpc = time.time(), [], None

    def checkpoint(step):
        if main:
            save_checkpoint(ckpt_dir / "last.pt", model=raw_model, optimizer=optimizer, step=step, config=config,
                            stage="pretrain", args=vars(args), extra={"val_bpc": val_bpc})
        accelerator.wait_for_everyone()

    step = start
    try:
        for step in bar:
            lr = lr_at(step, lr=args.lr, warmup=args.warmup, total=args.steps, min_ratio=args.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            step_loss = 0.0
            for micro in range(args.grad_accum):
                x = random_windows(train_data, args.batch_size, args.seq_len, step_generator(args.seed, step, micro, rank))
                x = x.to(accelerator.device)
                sync = micro == args.grad_accum - 1
                with nullcontext() if sync else accelerator.no_sync(model), accelerator.autocast():
                    loss = next_token_loss(model(x[:, :-1]), x[:, 1:]) / args.grad_accum
                    accelerator.backward(loss)
                step_loss += loss.item()
            if args.grad_clip > 0:
                accelerator.clip_grad_norm_(model.parameters(), args.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(step_loss)
            done = step + 1
            bar.set_postfix(loss=f"{step_loss:.3f}", bpc=f"{bits_per_char(step_loss):.3f}", lr=f"{lr:.2e}")
            row = {"step": done, "loss": step_loss, "train_bpc": bits_per_char(step_loss), "lr": lr}

            if done % args.eval_interval == 0 or done == end:
                val_bpc = evaluate_bpc(model, val_data, batches=args.eval_batches, batch_size=args.batch_size,
                                       seq_len=args.seq_len, rank=rank, accelerator=accelerator)
                row["val_bpc"] = val_bpc
                if main:
                    tqdm.write(f"step {done}: train loss {step_loss:.4f} | val {val_bpc:.4f} bpc")
            if args.sample_interval and done % args.sample_interval == 0 and main:
                prompt = val_data[:64].long().to(accelerator.device)
                out = generate(raw_model, [prompt], args.sample_tokens, temperature=0.8, top_k=32,
                               generator=step_generator(args.seed, done, 0).manual_seed(done))
                tqdm.write(f"--- sample at step {done} ---\n{decode_bytes(prompt)}|>>>|{decode_bytes(out.tokens[0])}\n---")
            log.write(**row)
            if done % args.checkpoint_interval == 0 or done == end:
                checkpoint(done)
            step = done
    except KeyboardInterrupt:
        if main:
            print(f"\ninterrupted at step {step}; the last checkpoint in {ckpt_dir} is intact "
                  f"(resume with --resume auto --checkpoint-dir {ckpt_dir})")
        raise

    bar.close()
    elapsed = time.time() - t0
    fingerprints = accelerator.gather(torch.tensor([params_fingerprint(model)], dtype=torch.float64,
                                                   device=accelerator.device)).tolist()
    if len(set(fingerprints)) > 1:
        raise RuntimeError(f"replicas disagree after training: parameter fingerprints {fingerprints}")
    summary = {
        "steps_run": end - start, "final_step": end, "seconds": round(elapsed, 1),
        "tokens_per_s": round(tokens_per_step * (end - start) / max(elapsed, 1e-9)),
        "final_train_loss": losses[-1] if losses else None, "val_bpc": val_bpc,
        "processes": accelerator.num_processes, "distributed_type": str(accelerator.distributed_type),
        "replica_fingerprints": fingerprints, "losses": losses, "checkpoint": str(ckpt_dir / "last.pt"),
    }
    if main:
        (ckpt_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        if log.rows:
            save_plot(ckpt_dir / "pretrain.png", {"bits per character": {
                "train": log.series("train_bpc"), "validation": log.series("val_bpc")}}, title="pretraining")
        print("\n=== pretraining summary ===")
        print(f"steps {start} -> {end} in {elapsed:.0f}s ({summary['tokens_per_s']:,} tokens/s, "
              f"{accelerator.num_processes} process(es), {summary['distributed_type']})")
        print(f"final train loss {summary['final_train_loss']:.4f} nats; validation {val_bpc:.4f} bits per char")
        print(f"replicas in sync: {len(set(fingerprints)) == 1} ({accelerator.num_processes} fingerprint(s))")
        print(f"checkpoint {summary['checkpoint']}, metrics {ckpt_dir / 'metrics.jsonl'}, plot {ckpt_dir / 'pretrain.png'}")
    accelerator.end_training()
    return summary


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    return {"pretrain": pretrain}[args.stage](args)


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
