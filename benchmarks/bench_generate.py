"""KV-cached generation vs re-running the full sequence every step (the same model, the same sampler).

    python benchmarks/bench_generate.py

New tokens/s for batch 1 and 8, prompt 64, 96/192/384 new tokens, on the 'tiny' config (dim 256, depth 4,
heads 4, dim_head 64). Also fits time = a * new_tokens^p to show how time grows with length (p = 1: linear).
"""

from __future__ import annotations

import argparse
import math
import time

import torch


from common import machine, print_table, save_json

from palm_rlhf import PaLM, PaLMConfig, generate


def time_generate(model, batch, prompt_len, new, use_cache, reps):
    prompts = torch.randint(0, 256, (batch, prompt_len), generator=torch.Generator().manual_seed(0))
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        out = generate(model, prompts, new, temperature=1.0, generator=torch.Generator().manual_seed(1),
                       use_cache=use_cache)
        times.append(time.perf_counter() - t)
        assert out.tokens.shape == (batch, new)
    return min(times)


def growth_exponent(lengths, times):
    xs, ys = [math.log(n) for n in lengths], [math.log(t) for t in times]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--lengths", type=int, nargs="+", default=[96, 192, 384])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--reps", type=int, default=2, help="best of this many runs (cached path)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.manual_seed(0)
    model = PaLM(PaLMConfig.preset(args.preset, max_seq_len=1024)).eval()
    print(f"machine: {machine()} | {args.preset}: {model.num_params() / 1e6:.2f}M params")
    rows, payload = [], []
    for batch in args.batches:
        cached, uncached = [], []
        for new in args.lengths:
            tc = time_generate(model, batch, 64, new, True, args.reps)
            tu = time_generate(model, batch, 64, new, False, 1)
            cached.append(tc)
            uncached.append(tu)
            rows.append([batch, new, batch * new / tc, batch * new / tu, tu / tc, tc, tu])
            payload.append(dict(batch=batch, new=new, cached_s=tc, uncached_s=tu, speedup=tu / tc))
            print(rows[-1], flush=True)
        rows.append([batch, "growth p", "", "", "", round(growth_exponent(args.lengths, cached), 2),
                     round(growth_exponent(args.lengths, uncached), 2)])
    print_table(f"generation, prompt 64, {machine()}", ["batch", "new tokens", "cached tok/s", "no-cache tok/s",
                "speedup", "cached s", "no-cache s"], rows)
    save_json(args.json, {"generate": payload})


if __name__ == "__main__":
    main()
