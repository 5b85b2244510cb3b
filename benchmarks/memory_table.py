"""Memory per process for training a PaLM, replicated (DDP) or sharded (FSDP), so you can size a machine before
renting it. Computed, not measured on GPUs (this machine has none):

- parameters, gradients and AdamW state: counted from the model (float32 weights, gradients for what is trained,
  two float32 moments per trained weight), divided by the process count under FSDP, plus the units FSDP gathers
  at once (the largest block, twice: the one computing and the one prefetched);
- activations: the bytes autograd saves for backward in one training step's forward pass, counted by hooking
  `torch.autograd.graph.saved_tensors_hooks` on the meta device: shapes only, nothing is allocated, so a 1B model
  is counted in a second. On real tensors the count is the same (tests/test_benchmarks.py checks it). Activations
  are not sharded by FSDP; they scale with batch x sequence (and the attention backend's own buffers: SDPA's
  flash/efficient kernels keep O(seq) per head; the math fallback would keep seq^2).
Not counted: the CUDA context and allocator slack (add ~1 GiB per GPU), temporary buffers inside one op, the
optimizer's transient copies, and PPO's extra forward passes (rollouts run without saving activations).

    python benchmarks/memory_table.py                   # presets + 1B, 8 processes, batch 8 per process
    python benchmarks/memory_table.py --processes 4 --batch-size 4 --seq-len 2048 --lora-r 16
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.autograd.graph import saved_tensors_hooks

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from palm_rlhf import LoRAConfig, PaLM, PaLMConfig  # noqa: E402
from palm_rlhf.lora import add_trainable_lora, use_lora  # noqa: E402
from palm_rlhf.palm import PRESETS, ParallelTransformerBlock, next_token_loss  # noqa: E402

GiB = 2 ** 30
BILLION = dict(dim=2048, depth=17, heads=16, dim_head=128, max_seq_len=2048)   # 1.01B parameters, one k/v head


def build(config: PaLMConfig, device: str, lora_r: int = 0) -> tuple[PaLM, list]:
    with torch.device(device):
        model = PaLM(config)
        trained = add_trainable_lora(model, "sft", LoRAConfig(r=lora_r)) if lora_r else list(model.parameters())
    return model, trained


class FusedAttentionSaves(torch.autograd.Function):
    """Stands in for SDPA on the meta device (where PyTorch falls back to the math path, which saves the seq x seq
    probabilities): saves what the fused kernels save for backward (q, k, v, the output and a float32 log-sum-exp
    per query and head), as SDPA's CPU kernel and the GPU flash / memory-efficient kernels do."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty_like(q)
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx, grad):
        raise NotImplementedError("shapes only: this stand-in is never differentiated")


def activation_bytes(config: PaLMConfig, batch: int, seq: int, device: str = "meta", lora_r: int = 0) -> int:
    """Bytes saved for backward by one forward pass + next-token loss (parameters themselves not counted)."""
    model, _ = build(config, device, lora_r)
    sdpa = F.scaled_dot_product_attention
    if device == "meta":
        model.check_tokens = lambda tokens: None   # its range check reads values, which meta tensors do not have
        F.scaled_dot_product_attention = lambda q, k, v, **kw: FusedAttentionSaves.apply(q, k, v)
    params = {id(p) for p in model.parameters()}
    seen, total = set(), 0

    def pack(t):
        nonlocal total
        base = t if t._base is None else t._base
        if id(t) not in params and id(base) not in params and id(base) not in seen:
            seen.add(id(base))
            keep.append(base)     # alive until counted, so ids are not reused
            total += base.untyped_storage().nbytes()
        return t

    keep: list = []
    tokens = torch.randint(0, config.num_tokens, (batch, seq + 1)).to(device)
    try:
        with saved_tensors_hooks(pack, lambda t: t), use_lora(model, *(["sft"] if lora_r else [])):
            next_token_loss(model(tokens[:, :-1]), tokens[:, 1:])
    finally:
        F.scaled_dot_product_attention = sdpa
    return total


def estimate(name: str, config: PaLMConfig, *, processes: int, batch: int, seq: int, lora_r: int) -> dict:
    model, trained = build(config, "meta", lora_r)
    p = sum(t.numel() for t in model.parameters())
    t = sum(x.numel() for x in trained)
    block = max(sum(x.numel() for x in m.parameters()) for m in model.modules()
                if isinstance(m, ParallelTransformerBlock))
    act = activation_bytes(config, batch, seq, lora_r=lora_r)
    weights, grads, adam = 4 * p, 4 * t, 8 * t
    ddp = {"weights": weights, "grads": grads, "adam": adam, "activations": act}
    fsdp = {"weights": weights / processes + 2 * 4 * block, "grads": grads / processes, "adam": adam / processes,
            "activations": act}
    return {"name": name, "params": p, "trained": t, "batch": batch, "seq": seq, "processes": processes,
            "ddp": ddp, "fsdp": fsdp, "ddp_total": sum(ddp.values()), "fsdp_total": sum(fsdp.values())}


def gib(x: float) -> str:
    return f"{x / GiB:.2f}" if x >= 0.01 * GiB else f"{x / 2 ** 20:.1f} MiB"


def table(rows: list[dict]) -> list[str]:
    lines = ["| model | params | trained | batch x seq | DDP: weights / grads / AdamW / activations = total (GiB) "
             "| FSDP: the same per process |", "|---|---|---|---|---|---|"]
    for r in rows:
        cells = []
        for mode in ("ddp", "fsdp"):
            m = r[mode]
            cells.append(" / ".join(gib(m[k]) for k in ("weights", "grads", "adam", "activations"))
                         + f" = **{gib(r[mode + '_total'])}**")
        lines.append(f"| {r['name']} | {r['params'] / 1e6:,.1f}M | {r['trained'] / 1e6:,.2f}M | {r['batch']} x "
                     f"{r['seq']} | {cells[0]} | {cells[1]} |")
    return lines


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=8, help="processes (GPUs) the model is sharded over")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per process per micro-batch")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: each model's max)")
    parser.add_argument("--lora-r", type=int, default=0, help="LoRA rank (0: full fine-tuning)")
    parser.add_argument("--presets", nargs="+", default=[n for n in PRESETS if n != "test"] + ["1b"])
    parser.add_argument("--json", default=None, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    rows = []
    for name in args.presets:
        config = PaLMConfig(**BILLION) if name == "1b" else PaLMConfig.preset(name)
        rows.append(estimate(name, config, processes=args.processes, batch=args.batch_size,
                             seq=args.seq_len or config.max_seq_len, lora_r=args.lora_r))
    print(f"{args.processes} processes, float32 weights, AdamW, "
          + (f"LoRA r {args.lora_r}" if args.lora_r else "full fine-tuning") + "; per process:")
    print("\n".join(table(rows)))
    if args.json:
        Path(args.json).write_text(json.dumps({"memory": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
