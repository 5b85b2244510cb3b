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
    root = str(Path(__file__).parent.parent)   # --against this same checkout: the subprocess path runs
    d = run(tmp_path, "bench_generate.py", "--preset", "test", "--lengths", "8", "16", "--batches", "2", "--reps", "1",
            "--against", root, "--rounds", "2")
    assert positive_numbers(d["generate"], "cached_s", "uncached_s", "against_s", "limit_peak", "limit_step") == 10
    assert d["peak_flops"] > 0 and d["decode_product_flops"] > 0


def test_bench_pretrain_race(tmp_path):
    """Two of our runs (the anchor needs a separate install) race for 2 s each and are scored on held-out text."""
    text = tmp_path / "corpus.txt"   # real text that every clone has: this repository's Python sources
    text.write_bytes(b"".join(f.read_bytes() for f in sorted((BENCH.parent / "palm_rlhf").glob("*.py"))))
    d = run(tmp_path, "bench_pretrain_race.py", "--data", str(text), "--budgets", "2", "--curve-every", "1",
            "--runs", "ours", "ours:gpt2", "--optims", "adamw", "--seq-len", "64", "--plot", str(tmp_path / "race.png"))
    assert positive_numbers(d["runs"], "bpc", "steps", "tokens_per_s") == 6 and (tmp_path / "race.png").is_file()


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


def test_memory_table_counts_what_the_model_holds(tmp_path):
    d = run(tmp_path, "memory_table.py", "--presets", "test", "tiny", "--processes", "4", "--seq-len", "64")
    assert positive_numbers(d["memory"], "ddp_total", "fsdp_total", "params") == 6
    sys.path.insert(0, str(BENCH))
    from memory_table import activation_bytes
    from palm_rlhf import PaLM, PaLMConfig
    for row in d["memory"]:
        config = PaLMConfig.preset(row["name"])
        assert row["params"] == PaLM(config).num_params() == row["trained"]
        assert row["fsdp"]["adam"] * 4 == row["ddp"]["adam"] and row["fsdp_total"] < row["ddp_total"]
    for lora_r in (0, 4):   # counted on the meta device (shapes only) == counted on real tensors
        meta = activation_bytes(PaLMConfig.preset("test"), 2, 32, "meta", lora_r=lora_r)
        assert meta == activation_bytes(PaLMConfig.preset("test"), 2, 32, "cpu", lora_r=lora_r) > 0


@pytest.mark.slow
def test_bench_fsdp_sampling(tmp_path):
    """Two processes: sharded sampling gives the unsharded model's tokens, gathered per layer or once."""
    d = run(tmp_path, "bench_fsdp.py", "--preset", "test", "--new-tokens", "4", "--batch", "2", "--reps", "1")
    assert d["fsdp_sampling"]["same_tokens"] is True
    seconds = d["fsdp_sampling"]["seconds"]
    assert len(seconds) == 3 and all(math.isfinite(v) and v > 0 for v in seconds.values())
