"""Time-to-bpc: our PaLM and the anchor's (palm-rlhf-pytorch 0.8.0) trained side by side on the same bytes, and
validation bits per character at fixed budgets of training time.

    python benchmarks/bench_pretrain_race.py --anchor-path /tmp/anchor_site              # 300 s and 1,200 s
    python benchmarks/bench_pretrain_race.py --budgets 300 --runs ours:gpt2 ours --optims adamw

Every run trains the same size (dim 256, depth 4, 4 heads of 64, one k/v head; the anchor's defaults otherwise,
xPos on) on random 256-byte windows of enwik6's first 95% (batch 8), with one identical loop: cross entropy on every
byte, gradient clipping, the optimiser below. Runs take turns step by step in one process, so the machine's noise
falls on all of them alike; each run's clock counts only its own steps (evaluation is not timed). At each budget (and
every --curve-every seconds, for the plot) a run is scored on the same 64 held-out windows of enwik6's last 5%.

Optimisers (--optims): adamw = ours (AdamW lr 1e-3, betas 0.9/0.95, 100 warm-up steps, then constant, clip 1.0);
anchor = the anchor's train.py (Lion lr 1e-4, betas 0.9/0.99, constant, clip 1.0 here), needs `lion-pytorch`.
Runs (--runs): `ours` (this checkout's defaults), `ours:NAME` (our model re-initialised by INITS[NAME] below, or
built with the architecture switch CONFIGS[NAME], for the ablation), `anchor` (needs --anchor-path, see bench_ppo.py
for the install line).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, print_table, save_json  # noqa: E402

SIZE = dict(dim=256, depth=4, heads=4, dim_head=64)


def init_gpt2(model):
    """The initialisation before this benchmark existed: N(0, 0.02) everywhere, residual outputs N(0, 0.02 /
    sqrt(2 depth)) (GPT-2)."""
    for name, p in model.named_parameters():
        if p.ndim == 2:
            std = 0.02 / math.sqrt(2 * model.config.depth) if name.endswith(("attn_out.weight", "ff_out.weight")) \
                else 0.02
            torch.nn.init.normal_(p, std=std)


def init_torch_default(model):
    """What the anchor gets: PyTorch's nn.Linear default (uniform, std 1 / sqrt(3 fan_in)), embedding N(0, 0.02)."""
    for name, p in model.named_parameters():
        if p.ndim == 2 and not name.startswith("token_emb"):
            torch.nn.init.kaiming_uniform_(p, a=math.sqrt(5))
        elif p.ndim == 2:
            torch.nn.init.normal_(p, std=0.02)


def init_fan_in(model):
    """Kernels N(0, 1 / fan_in) (PaLM's "fan-in variance scaling"), embedding N(0, 0.02)."""
    for name, p in model.named_parameters():
        if p.ndim == 2 and not name.startswith("token_emb"):
            torch.nn.init.normal_(p, std=p.shape[1] ** -0.5)
        elif p.ndim == 2:
            torch.nn.init.normal_(p, std=0.02)


def init_palm(model):
    """PaLM's own (arXiv 2204.02311, section 2): kernels N(0, 1 / fan_in), embedding N(0, 1), and because input and
    output embeddings are shared, logits scaled by 1 / sqrt(dim). Returns that logit scale."""
    init_fan_in(model)
    torch.nn.init.normal_(model.token_emb.weight, std=1.0)
    return model.config.dim ** -0.5


def init_zero_out(model):
    """fan-in, with each block's output projections (attention and feedforward) at zero: every block starts as the
    identity (as in ReZero / Fixup-style schemes)."""
    init_fan_in(model)
    for name, p in model.named_parameters():
        if name.endswith(("attn_out.weight", "ff_out.weight")):
            torch.nn.init.zeros_(p)


INITS = {"gpt2": init_gpt2, "torch": init_torch_default, "fanin": init_fan_in, "palm": init_palm,
         "zero": init_zero_out}
# architecture switches (PaLMConfig fields), each alone against this checkout's defaults
CONFIGS = {"plain": dict(token_shift=False, dropout=0.0), "shift": dict(token_shift=True, dropout=0.0),
           "drop": dict(token_shift=False, dropout=0.1), "shift_drop": dict(token_shift=True, dropout=0.1)}


def build(run: str, seq_len: int, anchor_path: str | None):
    """-> (model, logits_fn: tokens (b, n) -> logits (b, n, 256))."""
    if run == "anchor":
        if not anchor_path:
            raise SystemExit("run 'anchor' needs --anchor-path (palm-rlhf-pytorch 0.8.0 installed there)")
        from palm_rlhf_pytorch import PaLM as AnchorPaLM
        model = AnchorPaLM(num_tokens=256, flash_attn=True, **SIZE)
        return model, lambda x: model(x)
    from palm_rlhf import PaLM, PaLMConfig
    variant = run.split(":", 1)[1] if ":" in run else None
    if variant and variant not in INITS and variant not in CONFIGS:
        raise SystemExit(f"unknown run {run!r}: after 'ours:' give one of {sorted(INITS) + sorted(CONFIGS)}")
    model = PaLM(PaLMConfig(**SIZE, max_seq_len=seq_len, **CONFIGS.get(variant, {})))
    scale = INITS[variant](model) if variant in INITS else None
    if scale:
        return model, lambda x: model.to_logits(model(x, return_hidden=True)) * scale
    return model, lambda x: model(x)


def make_optimizer(name: str, params):
    if name == "adamw":
        return torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0), 100
    if name == "anchor":
        try:
            from lion_pytorch import Lion
        except ImportError:
            raise SystemExit("optimiser 'anchor' needs lion-pytorch (pip install lion-pytorch, or in --anchor-path)")
        return Lion(params, lr=1e-4, betas=(0.9, 0.99)), 0
    raise SystemExit(f"unknown optimiser {name!r}")


class Runner:
    def __init__(self, run, optim, args, train, val):
        torch.manual_seed(args.seed)
        self.name = f"{run} / {optim}"
        self.model, self.logits = build(run, args.seq_len, args.anchor_path)
        self.opt, self.warmup = make_optimizer(optim, self.model.parameters())
        self.lr = self.opt.param_groups[0]["lr"]
        self.train, self.val, self.args = train, val, args
        self.gen = torch.Generator().manual_seed(args.seed)   # the same batches for every run
        self.clock, self.steps, self.curve, self.at = 0.0, 0, [], {}

    def step(self):
        t = time.perf_counter()
        self.model.train()
        starts = torch.randint(0, len(self.train) - self.args.seq_len - 1, (self.args.batch,), generator=self.gen)
        batch = torch.stack([self.train[s:s + self.args.seq_len + 1] for s in starts.tolist()]).long()
        for group in self.opt.param_groups:
            group["lr"] = self.lr * min(1.0, (self.steps + 1) / self.warmup) if self.warmup else self.lr
        loss = F.cross_entropy(self.logits(batch[:, :-1]).transpose(1, 2), batch[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.steps += 1
        self.clock += time.perf_counter() - t

    @torch.no_grad()
    def bpc(self, windows=None) -> float:
        self.model.eval()
        windows = self.val if windows is None else windows
        losses = [F.cross_entropy(self.logits(w[:, :-1]).transpose(1, 2), w[:, 1:]) for w in windows.split(16)]
        return float(torch.stack(losses).mean()) / math.log(2)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="enwik6/enwik8 file (default: ../shared/data/enwik6.gz, then "
                                                "data/enwik6 fetched as palm_rlhf.data does)")
    p.add_argument("--runs", nargs="+", default=["ours", "anchor"])
    p.add_argument("--optims", nargs="+", default=["adamw", "anchor"])
    p.add_argument("--budgets", type=float, nargs="+", default=[300, 1200], help="seconds of training per run")
    p.add_argument("--curve-every", type=float, default=60)
    p.add_argument("--anchor-path", default=None)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", default=None, help="PNG of validation bpc against training seconds")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if args.anchor_path:
        sys.path.append(args.anchor_path)   # after ours and torch: it holds only the anchor and its small deps

    from palm_rlhf.data import load_corpus, split_corpus
    shared = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "enwik6.gz"
    source = args.data or (shared if shared.is_file() else "enwik6")
    train, val = split_corpus(load_corpus(source))
    g = torch.Generator().manual_seed(1234)
    starts = torch.randint(0, len(val) - args.seq_len - 1, (64,), generator=g)
    val = torch.stack([val[s:s + args.seq_len + 1] for s in starts.tolist()]).long()
    starts = torch.randint(0, len(train) - args.seq_len - 1, (64,), generator=g)   # seen in training, for the gap
    train_windows = torch.stack([train[s:s + args.seq_len + 1] for s in starts.tolist()]).long()

    runners = [Runner(r, o, args, train, val) for r in args.runs for o in args.optims]
    budgets = sorted(args.budgets)
    print(f"machine: {machine()} | data {source}: {len(train):,} training bytes | runs: "
          + ", ".join(r.name for r in runners), flush=True)
    marks = sorted(set(budgets) | {args.curve_every * i for i in range(1, int(budgets[-1] // args.curve_every) + 1)})
    for r in runners:
        r.marks = list(marks)
        r.curve.append((0.0, 0, r.bpc(), r.bpc(train_windows)))
    while any(r.marks for r in runners):
        for r in runners:
            if not r.marks:
                continue
            r.step()
            while r.marks and r.clock >= r.marks[0]:
                mark = r.marks.pop(0)
                bpc = r.bpc()
                r.curve.append((r.clock, r.steps, bpc, r.bpc(train_windows)))   # the last: memorisation
                if mark in budgets:
                    r.at[mark] = dict(bpc=bpc, steps=r.steps, seconds=r.clock,
                                      tokens_per_s=r.steps * args.batch * args.seq_len / r.clock)
                    print(f"{r.name}: {bpc:.4f} bpc after {r.clock:.0f} s ({r.steps} steps; training windows "
                          f"{r.curve[-1][3]:.4f})", flush=True)

    rows = [[r.name] + [r.at[b]["bpc"] for b in budgets] + [r.at[budgets[-1]]["steps"],
            r.at[budgets[-1]]["tokens_per_s"]] for r in runners]
    print_table(f"validation bpc after N seconds of training, {machine()}", ["run / optimiser"]
                + [f"bpc @ {b:g} s" for b in budgets] + ["steps", "tokens/s"], rows)
    if args.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for r in runners:
            ax.plot([c[0] for c in r.curve[1:]], [c[2] for c in r.curve[1:]], marker=".", label=r.name)
        for b in budgets:
            ax.axvline(b, color="grey", lw=0.5)
        ax.set(xlabel="training seconds (this CPU)", ylabel="validation bits per byte", title="time to bpc")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
    save_json(args.json, {"budgets": budgets, "runs": {r.name: dict(at={str(k): v for k, v in r.at.items()},
                                                                  curve=r.curve) for r in runners}})


if __name__ == "__main__":
    main()
