"""The frontier sweep end to end on a toy model: every method lands in the table, the plot and the files."""

import json
import shutil

import torch

from palm_rlhf import PaLM, PaLMConfig
from palm_rlhf.frontier import main


def test_frontier_runs_every_method(tmp_path, text_file, capsys):
    torch.manual_seed(0)
    PaLM(PaLMConfig.preset("test")).save(tmp_path / "base")
    argv = ["--init", str(tmp_path / "base"), "--data", str(text_file), "--out", str(tmp_path / "f"),
                   "--judge", "prose", "--eval-prompts", "4", "--pairs", "24", "--val-pairs", "4", "--rm-steps", "2",
                   "--best-of", "1", "2", "--ppo-kl-coefs", "0.05", "--ppo-steps", "1", "--long-ppo-steps", "2",
                   "--dpo-betas", "0.1", "--dpo-steps", "2", "--seeds", "2", "--prompt-len", "8",
                   "--response-len", "8", "--lora-r", "2", "--rm-lora-r", "2", "--group-kl-coefs", "0.05",
                   "--group-steps", "1", "--group-epochs", "2", "--ilql-samples", "16", "--ilql-steps", "2",
                   "--ilql-betas", "0", "4", "--corpus-pairs", "8", "--ppo-kl-budgets", "0", "0.5"]
    report = main(argv)
    methods = {(r["method"], r["setting"]): r for r in report["table"]}
    assert set(m for m, _ in methods) == {"best-of-N", "PPO (reward model)", "PPO (gold reward)", "DPO", "GRPO",
                                          "RLOO", "ILQL (offline)"}
    assert methods[("ILQL (offline)", "beta=4")]["seeds"] == 2 and methods[("GRPO", "kl_coef=0.05")]["seeds"] == 2
    scored = [json.loads(line) for line in (tmp_path / "f" / "data" / "scored.jsonl").read_text().splitlines()]
    assert len(scored) == 16 and all(set(r) == {"prompt", "response", "reward"} for r in scored)
    assert methods[("best-of-N", "N=1")]["kl"] == 0.0 and methods[("DPO", "beta=0.1")]["seeds"] == 2
    assert methods[("PPO (reward model)", "kl_coef=0.05, budget=0.5")]["seeds"] == 2
    # the reward model learns from the sampled pairs and the real-text ones, DPO from the sampled ones alone
    lines = lambda name: len((tmp_path / "f" / "data" / name).read_text().splitlines())  # noqa: E731
    assert lines("train.jsonl") == 32 and lines("train_sampled.jsonl") == 24
    assert "32 training pairs, DPO's 24 from" in capsys.readouterr().out
    assert len(report["curves"]["PPO (long run, rollouts)"]) == 2
    saved = json.loads((tmp_path / "f" / "frontier.json").read_text())
    assert saved["table"] == report["table"]
    md = (tmp_path / "f" / "frontier.md").read_text()
    assert (tmp_path / "f" / "frontier.png").is_file() and "| DPO | beta=0.1 | 2 |" in md
    assert all(len(p["samples"]) == 3 for p in report["points"]) and "- DPO beta=0.1:" in md
    # the same command again: every finished run is read back from f/points, none is trained again
    shutil.rmtree(tmp_path / "f" / "runs")
    rerun = main(argv)
    assert rerun["table"] == report["table"] and not (tmp_path / "f" / "runs").exists()
    # --report-only runs nothing: with one more seed asked for, that seed's runs are listed as missing
    shown = main(argv[:argv.index("--seeds") + 1] + ["3"] + argv[argv.index("--seeds") + 2:] + ["--report-only"])
    assert not (tmp_path / "f" / "runs").exists() and shown["table"] == report["table"]
    assert "dpo-beta0.1-s2" in shown["missing"] and "not run yet: " in (tmp_path / "f" / "frontier.md").read_text()
    # one more seed: only that seed's runs are trained
    more = main(argv[:argv.index("--seeds") + 1] + ["3"] + argv[argv.index("--seeds") + 2:])
    assert {p.name.rsplit("-s", 1)[1] for p in (tmp_path / "f" / "runs").iterdir()} == {"2"}
    assert {(r["method"], r["seeds"]) for r in more["table"]} >= {("DPO", 3), ("GRPO", 3), ("ILQL (offline)", 3)}
    # again from the same pairs and reward model, given as files: the same reward-model accuracy, nothing retrained
    given = tmp_path / "f"
    again = main(["--init", str(tmp_path / "base"), "--data", str(text_file), "--out", str(tmp_path / "g"),
                  "--judge", "prose", "--eval-prompts", "4", "--train", str(given / "data" / "train.jsonl"),
                  "--val", str(given / "data" / "val.jsonl"), "--reward", str(given / "reward" / "model"),
                  "--best-of", "1", "--ppo-kl-coefs", "0.05", "--ppo-steps", "1", "--long-ppo-steps", "0",
                  "--dpo-betas", "0.1", "--dpo-steps", "2", "--dpo-evals", "2", "--seeds", "1", "--prompt-len", "8",
                  "--response-len", "8", "--lora-r", "2", "--methods", "dpo",
                  "--dpo-train", str(given / "data" / "train_sampled.jsonl")])
    assert again["reward_model"] == report["reward_model"] and not (tmp_path / "g" / "reward").exists()
    assert {r["method"] for r in again["table"]} == {"best-of-N", "DPO", "DPO, along training"}  # and the reference
    assert {r["setting"] for r in again["table"] if r["method"] == "DPO, along training"} == {"beta=0.1, step 1"}
    # evaluated along the way, the run trains the same policy as the unbroken run of the first sweep (seed 0)
    first, pieces = ([p for p in r["points"] if p["method"] == "DPO" and p["seed"] == 0][0] for r in (report, again))
    assert (pieces["gold"], pieces["kl"], pieces["samples"]) == (first["gold"], first["kl"], first["samples"])


def test_workers_share_the_sweep_and_report_it_as_one(tmp_path, text_file):
    """--workers 2: two processes claim the runs between them, each run is done once, the parent reports them all."""
    torch.manual_seed(0)
    PaLM(PaLMConfig.preset("test")).save(tmp_path / "base")
    out = tmp_path / "f"
    (out / "points").mkdir(parents=True)
    (out / "points" / "dpo-beta0.1-s0.claim").touch()     # left by a sweep that was killed: not a live claim
    report = main(["--init", str(tmp_path / "base"), "--data", str(text_file), "--out", str(out), "--judge", "prose",
                   "--eval-prompts", "4", "--pairs", "24", "--val-pairs", "4", "--rm-steps", "2", "--best-of", "1",
                   "--dpo-betas", "0.1", "--dpo-steps", "2", "--seeds", "2", "--prompt-len", "8", "--response-len", "8",
                   "--lora-r", "2", "--rm-lora-r", "2", "--group-kl-coefs", "0.05", "--group-steps", "1",
                   "--group-prompts", "2", "--methods", "dpo", "grpo", "--workers", "2"])
    seeds = {r["method"]: r["seeds"] for r in report["table"]}
    assert seeds == {"best-of-N": 1, "DPO": 2, "GRPO": 2} and report["missing"] == []
    assert sorted(p.name for p in (out / "points").iterdir()) == [
        "dpo-beta0.1-s0.json", "dpo-beta0.1-s1.json", "grpo-kl0.05-s0.json", "grpo-kl0.05-s1.json",
        "reference-1-samples.json"]
    logs = [(out / f"worker-{w}.log").read_text() for w in (0, 1)]
    ran = sorted(line.split("] ")[1] for log in logs for line in log.splitlines() if line.endswith(": running"))
    assert ran == [f"{n}: running" for n in ("dpo-beta0.1-s0", "dpo-beta0.1-s1", "grpo-kl0.05-s0", "grpo-kl0.05-s1")]
