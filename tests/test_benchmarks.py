"""The benchmark scripts still run (tiny settings, CPU) and write positive, finite figures: a README number must come
from a command that works. Speed itself is never asserted here (shared machines are noisy)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def run(tmp_path, script, *args) -> dict:
    out = tmp_path / "out.json"
    proc = subprocess.run([sys.executable, str(BENCH / script), *args, "--json", str(out)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "|" in proc.stdout  # a table was printed
    return json.loads(out.read_text())


def positive_numbers(tree, *keys):
    """Every value under these keys, anywhere in the JSON, is a finite positive number; returns how many."""
    found = 0
    if isinstance(tree, dict):
        for k, v in tree.items():
            if k in keys:
                assert isinstance(v, (int, float)) and math.isfinite(v) and v > 0, (k, v)
                found += 1
            else:
                found += positive_numbers(v, *keys)
    elif isinstance(tree, list):
        found += sum(positive_numbers(v, *keys) for v in tree)
    return found


def test_bench_generate(tmp_path):
    d = run(tmp_path, "bench_generate.py", "--preset", "test", "--lengths", "8", "16", "--batches", "2", "--reps", "1")
    assert positive_numbers(d["generate"], "cached_s", "uncached_s") == 4


def test_bench_train(tmp_path):
    d = run(tmp_path, "bench_train.py", "--preset", "test", "--seqs", "32", "--steps", "1")
    assert positive_numbers(d["train"], "tok_s", "s_step") == 2


def test_bench_attention_cpu(tmp_path):
    d = run(tmp_path, "bench_attention.py", "--quick", "--sections", "decode,rotary")
    assert positive_numbers(d["decode"], "sdpa_gqa_us", "sdpa_expanded_us") == 4
    assert positive_numbers(d["rotary_ms"], "pytorch") == 1


@pytest.mark.slow
def test_bench_ppo_ours(tmp_path):
    """Both of our PPO rows, GRPO, RLOO and DPO (the anchor needs a separate install and is left out)."""
    d = run(tmp_path, "bench_ppo.py", "--iterations", "1")
    assert len(d["ppo"]) == 5
    assert positive_numbers(d["ppo"], "samples_per_s", "peak_rss_mb") == 10
