"""Sampling from a sharded (FSDP2) policy, two ways, side by side in one run of 2 processes on this CPU (gloo):

- per layer: FSDP's own hooks all-gather each block before it runs and free it after, at every decode step
  (64 new tokens = 64 gathers of every block);
- gathered once (`palm_rlhf.fsdp.gathered`, what rollouts use): one all-gather of every unit, then plain decoding,
  then reshard; costs the full parameters in memory while sampling;
and the unsharded model as the reference. Each process samples its own batch, as in PPO.

    python benchmarks/bench_fsdp.py [--preset tiny --batch 8 --new-tokens 64 --reps 3 --json out.json]
(re-launches itself under torchrun with 2 processes.)
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def launch(argv: list[str]) -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    return subprocess.call([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                            "127.0.0.1", "--master_port", str(port), __file__, *argv], env=env)


def main(args) -> dict:
    from accelerate import Accelerator

    from common import timeit
    from palm_rlhf import PaLM, PaLMConfig
    from palm_rlhf.fsdp import gathered, shard
    from palm_rlhf.sampling import generate

    acc = Accelerator(cpu=True)
    torch.manual_seed(0)
    plain = PaLM(PaLMConfig.preset(args.preset)).eval()
    sharded = PaLM(PaLMConfig.preset(args.preset)).eval()
    sharded.load_state_dict(plain.state_dict())
    shard(sharded)
    prompts = [torch.randint(0, 256, (16,), generator=torch.Generator().manual_seed(i + 100 * acc.process_index))
               for i in range(args.batch)]

    def draw(model):
        return generate(model, prompts, args.new_tokens, generator=torch.Generator().manual_seed(1)).tokens

    def gathered_draw():
        with gathered(sharded):
            return draw(sharded)

    same = torch.equal(draw(plain), draw(sharded)) and torch.equal(draw(plain), gathered_draw())
    times = {"unsharded": timeit(lambda: draw(plain), warmup=1, reps=args.reps),
             "sharded, gathered per layer": timeit(lambda: draw(sharded), warmup=1, reps=args.reps),
             "sharded, gathered once": timeit(gathered_draw, warmup=1, reps=args.reps)}
    result = {"preset": args.preset, "batch": args.batch, "new_tokens": args.new_tokens, "processes": 2,
              "same_tokens": same, "seconds": times,
              "tokens_per_s": {k: args.batch * args.new_tokens / v for k, v in times.items()}}
    if acc.is_main_process:
        print(f"{args.preset}, {args.batch} prompts x {args.new_tokens} new tokens per process, 2 processes "
              f"(gloo, CPU); identical tokens all three ways: {same}")
        print("| sampling | seconds | new tokens/s per process | vs unsharded |\n|---|---|---|---|")
        for k, v in times.items():
            print(f"| {k} | {v:.3f} | {result['tokens_per_s'][k]:,.0f} | {times['unsharded'] / v:.2f}x |")
        if args.json:
            Path(args.json).write_text(json.dumps({"fsdp_sampling": result}, indent=1))
    sys.stdout.flush()
    os._exit(0)   # see PLATFORM.md: gloo threads can abort a clean interpreter shutdown


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if "LOCAL_RANK" not in os.environ:
        sys.exit(launch(sys.argv[1:]))
    main(args)
