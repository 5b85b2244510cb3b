"""Attention backends side by side: TFLOP/s of forward and forward+backward, decode latency, PaLM training tokens/s.

    python benchmarks/bench_attention.py            # GPU: Triton vs SDPA vs reference; CPU: SDPA vs reference
    python benchmarks/bench_attention.py --quick    # fewer shapes
    python benchmarks/bench_attention.py --sections attention,train   # a subset (attention, decode, train, rotary)

Training runs each backend with the fused rotary kernel ("+rotary") and SDPA also without it (rotary in PyTorch).

Multi-query attention (one k/v head), causal, bf16 on GPU (fp32 on CPU). SDPA runs twice: with k/v expanded to
all heads beforehand (expansion not timed) and with enable_gqa=True. FLOPs count the causal half only:
forward 2 matmuls x 2*b*h*n*n*d / 2; backward 2.5x forward.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F


from common import machine, print_table, save_json, timeit

import palm_rlhf.attention as attention
from palm_rlhf.attention import reference_attention, triton_available
from palm_rlhf.palm import PaLM, PaLMConfig, apply_rotary, next_token_loss


def providers(device):
    p = {
        "sdpa_gqa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
        "sdpa_expanded": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        "reference": lambda q, k, v: reference_attention(q, k, v, causal=True),
    }
    if device == "cuda" and triton_available():
        from palm_rlhf.kernels import flash_attention
        p = {"triton": lambda q, k, v: flash_attention(q, k, v, causal=True), **p}
    return p


def attention_table(device, dtype, seqs, dims, heads_list, tokens, ref_max_seq):
    rows = []
    for d in dims:
        for h in heads_list:
            for n in seqs:
                b = max(1, tokens // n)
                gen = torch.Generator(device=device).manual_seed(0)
                q = torch.randn(b, h, n, d, device=device, dtype=dtype, generator=gen)
                k = torch.randn(b, 1, n, d, device=device, dtype=dtype, generator=gen)
                v = torch.randn(b, 1, n, d, device=device, dtype=dtype, generator=gen)
                do = torch.randn_like(q)
                fwd_flops = 4 * b * h * n * n * d / 2
                row = {"d": d, "heads": h, "seq": n, "batch": b}
                for name, fn in providers(device).items():
                    if name == "reference" and n > ref_max_seq:
                        continue
                    kk, vv = (k.expand(b, h, n, d).contiguous(), v.expand(b, h, n, d).contiguous()) \
                        if name == "sdpa_expanded" else (k, v)
                    qg, kg, vg = (t.detach().requires_grad_() for t in (q, kk, vv))

                    def fwd_bwd():
                        qg.grad = kg.grad = vg.grad = None
                        fn(qg, kg, vg).backward(do)
                    # Autotune (a new shape bucket) before timing: on the H100 the first figure taken right after
                    # tuning came out up to 1.4x low (same kernel, same shape, next measurement; results/ v3).
                    for _ in range(3):
                        with torch.no_grad():
                            fn(q, kk, vv)
                        fwd_bwd()
                    with torch.no_grad():
                        t_f = timeit(lambda: fn(q, kk, vv), device=device)
                    t_fb = timeit(fwd_bwd, device=device)
                    row[f"{name}_fwd"] = fwd_flops / t_f / 1e12
                    row[f"{name}_fwdbwd"] = 3.5 * fwd_flops / t_fb / 1e12
                    del qg, kg, vg
                rows.append(row)
                print({k: (round(v, 1) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    return rows


def decode_table(device, dtype, lengths, batch, heads, d):
    rows = []
    for n in lengths:
        gen = torch.Generator(device=device).manual_seed(0)
        q = torch.randn(batch, heads, 1, d, device=device, dtype=dtype, generator=gen)
        k = torch.randn(batch, 1, n, d, device=device, dtype=dtype, generator=gen)
        v = torch.randn(batch, 1, n, d, device=device, dtype=dtype, generator=gen)
        mask = torch.ones(batch, n, dtype=torch.bool, device=device)
        mask[0, : n // 4] = False  # one left-padded row
        row = {"cache_len": n}
        with torch.no_grad():
            if device == "cuda" and triton_available():
                from palm_rlhf.kernels import decode_attention
                row["triton_us"] = timeit(lambda: decode_attention(q, k, v, kv_mask=mask), device=device) * 1e6
            row["sdpa_gqa_us"] = timeit(lambda: F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask[:, None, None], enable_gqa=True), device=device) * 1e6
            ke, ve = k.expand(batch, heads, n, d).contiguous(), v.expand(batch, heads, n, d).contiguous()
            row["sdpa_expanded_us"] = timeit(lambda: F.scaled_dot_product_attention(
                q, ke, ve, attn_mask=mask[:, None, None]), device=device) * 1e6
        rows.append(row)
    return rows


def training_table(device, preset, seqs, batch_tokens, backends):
    """backends: labels "<backend>[+rotary]"; +rotary = the fused rotary kernel, else rotary in PyTorch."""
    rows = []
    for n in seqs:
        b = max(1, batch_tokens // n)
        row = {"seq": n, "batch": b}
        for label in backends:
            backend = label.split("+")[0]
            attention.FUSED_ROTARY = label.endswith("+rotary")
            torch.manual_seed(0)
            model = PaLM(PaLMConfig.preset(preset, max_seq_len=n + 1, attn_backend=backend)).to(device)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")
            x = torch.randint(0, 256, (b, n + 1), device=device)

            def step():
                with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
                    loss = next_token_loss(model(x[:, :-1]), x[:, 1:])
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            try:
                t = timeit(step, warmup=3, reps=8 if device == "cuda" else 3,
                           device=device if device == "cpu" else "cuda_loop")
            except torch.OutOfMemoryError:
                row[f"{label} tok/s"] = "OOM"
                continue
            row[f"{label} tok/s"] = b * n / t
            del model, opt
        attention.FUSED_ROTARY = True
        rows.append(row)
        print(row, flush=True)
    return rows


def rotary_time(device, preset, n, b, fused: bool):
    """Forward + backward time of the q/k rotary per training step (all layers), on the fused projection's view."""
    c = PaLMConfig.preset(preset)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    heads = c.heads + c.kv_heads
    proj = torch.randn(b, n, heads * c.dim_head, device=device, dtype=dtype, requires_grad=True)
    qk = proj.view(b, n, heads, c.dim_head).transpose(1, 2)
    grad = torch.randn(b, heads, n, c.dim_head, device=device, dtype=dtype)
    cos, sin, _ = PaLM(c).rotary.to(device)(torch.arange(n, device=device).expand(b, n))
    if fused:
        from palm_rlhf.kernels import fused_rotary as rotate
    else:
        rotate = apply_rotary

    def rot():
        proj.grad = None
        rotate(qk, cos, sin).backward(grad)
    return timeit(rot, device=device) * c.depth


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file (after each section)")
    p.add_argument("--sections", default="attention,decode,train,rotary", help="which, in this order")
    args = p.parse_args()
    results = {}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"machine: {machine()}")
    if device == "cuda":
        dtype, seqs, dims, heads, tokens, ref_max = torch.bfloat16, [512, 1024, 2048, 4096, 8192], [64, 128], \
            [8, 16], 16384, 4096
        if args.quick:
            seqs, heads = [1024, 4096], [8]
        dec_lengths, train_seqs, preset = [512, 1024, 2048, 4096, 8192], [1024, 4096], "enwik8"
        backends = ["sdpa", "sdpa+rotary", "triton", "triton+rotary", "reference"]
        train_tokens = 16384
    else:
        dtype, seqs, dims, heads, tokens, ref_max = torch.float32, [128, 256, 512], [64], [8], 2048, 512
        dec_lengths, train_seqs, preset, backends, train_tokens = [512, 2048], [256], "tiny", ["sdpa", "reference"], 1024
    for section in args.sections.split(","):
        if section == "attention":
            attention_section(device, dtype, seqs, dims, heads, tokens, ref_max, results, args.json)
        elif section == "decode":
            dec = decode_table(device, dtype, dec_lengths, batch=8, heads=16 if device == "cuda" else 8,
                               d=128 if device == "cuda" else 64)
            print_table("decode latency (us), batch 8, one k/v head", list(dec[0].keys()),
                        [list(r.values()) for r in dec])
            results["decode"] = dec
        elif section == "train":
            train = training_table(device, preset, train_seqs, train_tokens, backends)
            print_table(f"PaLM '{preset}' training tokens/s (fwd+bwd+AdamW"
                        f"{', bf16 autocast' if device == 'cuda' else ''})",
                        list(train[0].keys()), [list(r.values()) for r in train])
            results["training"] = train
        elif section == "rotary":
            n_rot, b_rot = (4096, 16) if device == "cuda" else (256, 4)  # large enough that launches do not dominate
            results["rotary_ms"] = {"pytorch": rotary_time(device, preset, n_rot, b_rot, fused=False) * 1e3}
            if device == "cuda" and triton_available():
                results["rotary_ms"]["fused"] = rotary_time(device, preset, n_rot, b_rot, fused=True) * 1e3
            print(f"\nq/k rotary fwd+bwd per training step ('{preset}', all layers, seq {n_rot} batch {b_rot}): "
                  + ", ".join(f"{k} {v:.2f} ms" for k, v in results["rotary_ms"].items()))
        else:
            raise SystemExit(f"unknown section {section!r}; choose from attention, decode, train, rotary")
        save_json(args.json, results)


def attention_section(device, dtype, seqs, dims, heads, tokens, ref_max, results, json_path):
    attn = attention_table(device, dtype, seqs, dims, heads, tokens, ref_max)
    names = [k[:-4] for k in attn[0] if k.endswith("_fwd")]
    print_table(f"attention TFLOP/s, causal MQA, {dtype}, {machine()}", ["d", "heads", "seq", "batch"] +
                [f"{n} fwd" for n in names] + [f"{n} fwd+bwd" for n in names],
                [[r["d"], r["heads"], r["seq"], r["batch"]] + [r.get(f"{n}_fwd", "-") for n in names] +
                 [r.get(f"{n}_fwdbwd", "-") for n in names] for r in attn])
    if device == "cuda" and "triton" in names:
        for r in attn:
            if r["seq"] == 4096 and "sdpa_gqa_fwdbwd" in r:
                best = max(r["sdpa_gqa_fwdbwd"], r["sdpa_expanded_fwdbwd"])
                print(f"seq 4096 d {r['d']} h {r['heads']}: triton fwd+bwd / best SDPA = "
                      f"{r['triton_fwdbwd'] / best:.2f}x; triton fwd = {r['triton_fwd']:.0f} TFLOP/s")
    results["attention"] = attn
    save_json(json_path, results)


if __name__ == "__main__":
    main()
