"""KV-cached generation: new tokens/s against this machine's arithmetic limit, against re-running the full sequence
every step, and (optionally) against another checkout of palm_rlhf measured in the same run.

    python benchmarks/bench_generate.py                                   # limit, cached, no cache
    python benchmarks/bench_generate.py --against /tmp/old --no-uncached  # + an older checkout, side by side

The 'tiny' config by default (--preset; dim 256, depth 4, heads 4, dim_head 64; 3.87M parameters), prompt 64,
sampling at temperature 1, batch 1 and 8, 96/192/384 new tokens (prefill included in the time). The arithmetic limit
is
    matmul rate / FLOPs per generated token,
FLOPs per token = 2 x (every weight matrix a token passes through, the tied output included) + attention's
4 x heads x dim_head x depth x (mean context of the run). Two rates are measured here, before the runs: the peak
(a 1024 x 1024 x 1024 fp32 matmul) and the rate of a decode step's own products (every weight matrix of the model
times 8 rows, back to back, as W @ x^T: no other op), which is what a perfect batch-8 decoder would run at.
--against PATH: each measurement also runs on the palm_rlhf package under PATH (e.g. a `git worktree` of an older
commit), in a subprocess, alternating with ours --rounds times (best of all), so both see the same machine states:
on a shared VM the speed drifts by +-30% over minutes.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, print_table, save_json  # noqa: E402

PROMPT = 64


def best_seconds(fn, reps: int) -> float:
    """Seconds per call of fn: 3 warm-up calls, then the best of 5 loops of `reps` calls."""
    for _ in range(3):
        fn()
    best = math.inf
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        best = min(best, (time.perf_counter() - t) / reps)
    return best


def matmul_rate(m: int, k: int, n: int, reps: int) -> float:
    a, b = torch.randn(m, k), torch.randn(k, n)
    return 2 * m * k * n / best_seconds(lambda: a @ b, reps)


def decode_product_rate(model, rows: int = 8) -> float:
    """FLOP/s of every weight matrix of the model times `rows` rows, back to back (W @ x^T), best of 5 x 50."""
    weights = [p.detach() for name, p in model.named_parameters() if p.ndim == 2]     # the embedding is the output
    xs = [torch.randn(rows, w.shape[1]) for w in weights]
    seconds = best_seconds(lambda: [w @ x.t() for w, x in zip(weights, xs)], 50)
    return sum(2 * rows * w.numel() for w in weights) / seconds


def flops_per_token(config, context: float) -> float:
    c = config
    matrices = c.depth * c.dim * (c.heads * c.dim_head + 2 * c.kv_heads * c.dim_head + 2 * c.ff_inner)  # to_fused
    matrices += c.depth * (c.heads * c.dim_head * c.dim + c.ff_inner * c.dim) + c.num_tokens * c.dim
    return 2 * matrices + 4 * c.depth * c.heads * c.dim_head * context


def time_generate(preset: str, batch: int, new: int, use_cache: bool, reps: int) -> float:
    """Best of `reps` seconds for one generate call (the palm_rlhf on sys.path, the preset at seed 0)."""
    from palm_rlhf import PaLM, PaLMConfig, generate
    torch.manual_seed(0)
    model = PaLM(PaLMConfig.preset(preset, max_seq_len=1024)).eval()
    prompts = torch.randint(0, 256, (batch, PROMPT), generator=torch.Generator().manual_seed(0))
    best = math.inf
    for _ in range(reps):
        t = time.perf_counter()
        out = generate(model, prompts, new, temperature=1.0, generator=torch.Generator().manual_seed(1),
                       use_cache=use_cache)
        best = min(best, time.perf_counter() - t)
        assert out.tokens.shape == (batch, new)
    return best


def time_other(src: str, preset: str, batch: int, new: int, reps: int) -> float:
    here = str(Path(__file__).parent)
    code = (f"import sys; sys.path.insert(0, {src!r}); sys.path.insert(1, {here!r}); import palm_rlhf, "
            f"bench_generate as b; assert palm_rlhf.__file__.startswith({src!r}), palm_rlhf.__file__; "
            f"print(b.time_generate({preset!r}, {batch}, {new}, True, {reps}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def growth_exponent(lengths, times):
    xs, ys = [math.log(n) for n in lengths], [math.log(t) for t in times]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--lengths", type=int, nargs="+", default=[96, 192, 384])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--reps", type=int, default=3, help="best of this many runs (cached path)")
    p.add_argument("--against", default=None, help="a directory holding another palm_rlhf package to time beside ours")
    p.add_argument("--rounds", type=int, default=3, help="with --against: alternate ours and theirs this many times")
    p.add_argument("--no-uncached", action="store_true", help="skip the (slow) re-run-everything reference")
    p.add_argument("--json", default=None)
    args = p.parse_args()

    from palm_rlhf import PaLM, PaLMConfig
    config = PaLMConfig.preset(args.preset, max_seq_len=1024)
    peak = matmul_rate(1024, 1024, 1024, reps=5)
    step_rate = decode_product_rate(PaLM(config).eval())
    print(f"machine: {machine()} | {args.preset}: {PaLM(config).num_params() / 1e6:.2f}M params")
    print(f"matmul rate: peak {peak / 1e9:.1f} GFLOP/s (1024^3 fp32); a batch-8 decode step's products "
          f"{step_rate / 1e9:.1f} GFLOP/s ({step_rate / peak:.0%} of peak)")

    rows, payload = [], []
    for batch in args.batches:
        cached = []
        for new in args.lengths:
            tc = time_generate(args.preset, batch, new, True, args.reps)
            if args.against:
                to = time_other(args.against, args.preset, batch, new, args.reps)
                for _ in range(args.rounds - 1):
                    tc = min(tc, time_generate(args.preset, batch, new, True, args.reps))
                    to = min(to, time_other(args.against, args.preset, batch, new, args.reps))
            cached.append(tc)
            fpt = flops_per_token(config, PROMPT + new / 2)
            rate = batch * new / tc
            row = dict(batch=batch, new=new, cached_s=tc, tokens_per_s=rate, flops_per_token=fpt,
                       limit_peak=peak / fpt, limit_step=step_rate / fpt)
            cells = [batch, new, rate, f"{rate * fpt / peak:.0%}", f"{rate * fpt / step_rate:.0%}"]
            if args.against:
                row.update(against_s=to, against_tokens_per_s=batch * new / to, speedup_vs_against=to / tc)
                cells += [batch * new / to, f"{to / tc:.2f}x"]
            if not args.no_uncached:
                tu = time_generate(args.preset, batch, new, False, 1)
                row.update(uncached_s=tu, cache_speedup=tu / tc)
                cells += [batch * new / tu, f"{tu / tc:.1f}x"]
            rows.append(cells)
            payload.append(row)
            print(json.dumps(row), flush=True)
        if len(set(args.lengths)) > 1:  # how time grows with length needs two lengths
            rows.append([batch, f"growth p {growth_exponent(args.lengths, cached):.2f}"] + [""] * (len(rows[-1]) - 2))
    header = ["batch", "new tokens", "tokens/s", "of peak limit", "of decode-product limit"]
    if args.against:
        header += ["--against tokens/s", "ours vs --against"]
    if not args.no_uncached:
        header += ["no-cache tokens/s", "cache speed-up"]
    print_table(f"generation, prompt {PROMPT}, {machine()}", header, rows)
    fpt = flops_per_token(config, PROMPT + 192 / 2)
    print(f"\nlimits at 192 new tokens: {fpt / 1e6:.2f} MFLOP per token; {peak / fpt:,.0f} tokens/s at the peak rate, "
          f"{step_rate / fpt:,.0f} at the decode-product rate")
    save_json(args.json, {"peak_flops": peak, "decode_product_flops": step_rate, "generate": payload})


if __name__ == "__main__":
    main()
