"""Training throughput and peak memory: tokens/s and peak RSS (CPU) or CUDA memory for one optimizer step.

    python benchmarks/bench_train.py              # 'tiny' config, batch 4, seq 256 and 1024
"""

from __future__ import annotations

import argparse
import time

import torch


from common import machine, peak_rss_mb, print_table, save_json

from palm_rlhf import PaLM, PaLMConfig, next_token_loss


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--seqs", type=int, nargs="+", default=[256, 1024])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=6, help="timed steps (after 2 warm-up steps)")
    p.add_argument("--backend", default="auto")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"machine: {machine()}")
    rows = []
    for n in args.seqs:
        torch.manual_seed(0)
        model = PaLM(PaLMConfig.preset(args.preset, max_seq_len=max(n + 1, 1024), attn_backend=args.backend))
        model = model.to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        x = torch.randint(0, 256, (args.batch, n + 1), device=device)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times = []
        for i in range(args.steps + 2):
            t = time.perf_counter()
            loss = next_token_loss(model(x[:, :-1]), x[:, 1:])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if device == "cuda":
                torch.cuda.synchronize()
            if i >= 2:
                times.append(time.perf_counter() - t)
        times.sort()
        step = times[len(times) // 2]
        mem = torch.cuda.max_memory_allocated() / 2 ** 20 if device == "cuda" else peak_rss_mb()
        rows.append([args.preset, n, args.batch, args.batch * n / step, step, mem])
        print(rows[-1], flush=True)
    print_table(f"training step (fwd+bwd+AdamW), {machine()}", ["preset", "seq", "batch", "tokens/s", "s/step",
                "peak MiB (CUDA alloc)" if device == "cuda" else "peak RSS MiB (process)"], rows)
    save_json(args.json, {"train": [dict(zip(["preset", "seq", "batch", "tok_s", "s_step", "peak_mib"], r))
                                    for r in rows]})


if __name__ == "__main__":
    main()
