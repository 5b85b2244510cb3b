"""What a new user hits: diverging runs, re-runs of finished runs, bad flags, Ctrl-C, stale temp files, --help,
and seeing what a model writes (`train.py sample`)."""

import io
import json
import math

import pytest
import torch

from palm_rlhf import PaLM, PretrainConfig, PretrainTrainer, cli
from palm_rlhf.checkpoint import read_training_state
from palm_rlhf.training import NonFiniteError


def pretrain_args(text_file, ckpt, *extra):
    return ["pretrain", "--preset", "test", "--data", str(text_file), "--seq-len", "32", "--batch-size", "4",
            "--eval-interval", "4", "--eval-batches", "1", "--sample-interval", "0", "--warmup", "1",
            "--checkpoint-dir", str(ckpt), "--quiet", *extra]


def run(argv, capsys) -> tuple[int, str, str]:
    """The console entry point as a user runs it: exit code, stdout, stderr."""
    with pytest.raises(SystemExit) as exit_:
        cli.run(argv)
    out = capsys.readouterr()
    return exit_.value.code, out.out, out.err


def all_finite(path) -> bool:
    return all(t.isfinite().all() for t in read_training_state(path, "pretrain")["model"].values())


def test_a_diverging_run_stops_and_keeps_the_last_good_checkpoint(text_file, tmp_path, capsys):
    code, _, err = run(pretrain_args(text_file, tmp_path, "--steps", "6", "--lr", "1e9", "--checkpoint-interval",
                                     "1"), capsys)
    assert code == 2 and "not finite" in err and "--on-nonfinite skip" in err
    step = int(err.split("pretrain step ")[1].split(":")[0])
    state = read_training_state(tmp_path / "last.pt", "pretrain")
    assert state["step"] == step - 1 and f"(step {step - 1}), is intact" in err  # the step before, saved
    assert all_finite(tmp_path / "last.pt")                                     # no NaN was ever written
    with pytest.raises(NonFiniteError, match=r"step \d+: loss nan"):
        cli.main(pretrain_args(text_file, tmp_path / "again", "--steps", "6", "--lr", "1e9"))


def test_skip_mode_skips_a_bad_batch_without_updating(text_file, tmp_path):
    config = PretrainConfig(steps=5, seq_len=16, batch_size=2, eval_interval=0, eval_batches=1, sample_interval=0,
                            warmup=1, on_nonfinite="skip", quiet=True, cpu=True, checkpoint_dir=str(tmp_path))
    torch.manual_seed(0)
    trainer = PretrainTrainer(PaLM(cli.PaLMConfig.preset("test")), cli.load_corpus(text_file), config)
    real_loss, weights = trainer.loss, {}

    def loss(step, micro):
        value, metrics = real_loss(step, micro)
        if step == 2:
            weights["before"] = [p.detach().clone() for p in trainer.params]
            return value * float("nan"), metrics
        if step == 3:
            weights["after"] = [p.detach().clone() for p in trainer.params]
        return value, metrics
    trainer.loss = loss
    summary = trainer.train()
    assert summary["final_step"] == 5 and summary["skipped_steps"] == 1
    assert all(torch.equal(a, b) for a, b in zip(weights["before"], weights["after"]))  # step 3 changed nothing
    assert [r.get("skipped") for r in summary["history"]] == [None, None, 1, None, None]
    assert len(summary["losses"]) == 4 and all(math.isfinite(x) for x in summary["losses"])


def test_skip_mode_gives_up_after_ten_bad_batches_in_a_row(text_file, tmp_path):
    with pytest.raises(NonFiniteError, match="10 batches in a row"):
        cli.main(pretrain_args(text_file, tmp_path, "--steps", "30", "--lr", "1e9", "--on-nonfinite", "skip"))


def test_a_short_run_finishes_its_warm_up_prints_a_sample_and_an_honest_speed(text_file, tmp_path, capsys):
    args = [a for a in pretrain_args(text_file, tmp_path, "--steps", "1", "--warmup", "100")]
    i = args.index("--sample-interval")
    del args[i:i + 2]                                   # the default interval (500) is longer than the run
    summary = cli.main(args + ["--sample-tokens", "8"])
    out = capsys.readouterr().out
    assert "--- sample at step 1 ---" in out and "warm-up shortened to 0 steps" in out
    assert summary["history"][0]["lr"] == pytest.approx(PretrainConfig.lr)  # the peak rate, not 1% of it
    # tokens / the unrounded run time: a 1-step run takes a few ms, which used to round to 0.0 s (1e12 tokens/s)
    assert 0 < summary["tokens_per_s"] < 1e8 and math.isfinite(summary["tokens_per_s"])


def test_finished_runs_and_zero_steps_exit_cleanly(text_file, tmp_path, capsys):
    first = cli.main(pretrain_args(text_file, tmp_path, "--steps", "3"))
    assert first["final_step"] == 3
    code, out, err = run(pretrain_args(text_file, tmp_path, "--steps", "3", "--resume", "auto"), capsys)
    assert code == 0 and "already at step 3 of 3" in out and not err
    code, out, err = run(pretrain_args(text_file, tmp_path / "zero", "--steps", "0"), capsys)
    assert code == 0 and "already at step 0 of 0" in out and not err


@pytest.mark.parametrize("argv,message", [
    (["--batch-size", "0"], "--batch-size 0: must be >= 1"),
    (["--batch-size", "-2"], "--batch-size -2: must be >= 1"),
    (["--lr", "0"], "--lr 0.0: must be > 0"),
    (["--betas", "0.9", "1.5"], "--betas 0.9 1.5: two numbers in [0, 1)"),
    (["--seq-len", "4096"], "--seq-len 4096: exceeds the model's max_seq_len 128"),
    (["--model", "width=3"], "--model width: not a PaLMConfig field"),
])
def test_errors_name_the_flag_and_the_value(text_file, tmp_path, capsys, argv, message):
    code, _, err = run(pretrain_args(text_file, tmp_path, "--steps", "1", *argv), capsys)
    assert code == 2 and message in err and "Traceback" not in err, err


def test_errors_of_the_other_stages_name_the_flag_and_the_input(text_file, tmp_path, capsys):
    cli.main(pretrain_args(text_file, tmp_path / "base", "--steps", "1"))
    base = str(tmp_path / "base" / "last.pt")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) for _ in range(10)))
    code, _, err = run(["reward", "--init", base, "--train", str(pairs), "--batch-size", "0", "--quiet"], capsys)
    assert code == 2 and "--batch-size 0: must be >= 1" in err
    code, _, err = run(["reward", "--init", base, "--train", str(pairs), "--lora-r", "-1"], capsys)
    assert code == 2 and "--lora-r -1: must be >= 0" in err
    code, _, err = run(["ppo", "--init", base, "--reward", base, "--top-k", "20"], capsys)
    assert code == 2 and "--top-k 20: PPO samples from the full temperature-scaled distribution" in err
    code, _, err = run(pretrain_args(tmp_path, tmp_path / "x", "--steps", "1"), capsys)      # a folder as --data
    assert code == 2 and "is a directory; pass a text file" in err
    not_a_checkpoint = tmp_path / "notes.txt"
    not_a_checkpoint.write_text("hello")
    code, _, err = run(["sft", "--init", str(not_a_checkpoint), "--train", str(pairs)], capsys)
    assert code == 2 and "not a PyTorch file" in err and "weights_only" not in err


def test_the_test_preset_runs_with_the_default_window(text_file, tmp_path):
    args = [a for a in pretrain_args(text_file, tmp_path, "--steps", "1")]
    i = args.index("--seq-len")
    del args[i:i + 2]
    assert cli.main(args)["final_step"] == 1  # seq_len defaults to the model's max_seq_len (128) when below 256


def test_ctrl_c_keeps_the_checkpoint_and_says_how_to_resume(text_file, tmp_path, capsys, monkeypatch):
    from palm_rlhf import pretrain
    real = pretrain.PretrainTrainer.loss

    def interrupted(self, step, micro):
        if step == 3:
            raise KeyboardInterrupt
        return real(self, step, micro)
    monkeypatch.setattr(pretrain.PretrainTrainer, "loss", interrupted)
    argv = pretrain_args(text_file, tmp_path, "--steps", "6", "--checkpoint-interval", "2")
    code, out, err = run(argv, capsys)
    assert code == 130 and "Traceback" not in err
    assert f"Continue with: python train.py {' '.join(argv)} --resume auto" in err
    assert "interrupted at step 3" in out and "(step 2), is intact" in out
    assert read_training_state(tmp_path / "last.pt", "pretrain")["step"] == 2
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith("tmp")] == []
    monkeypatch.undo()
    assert cli.main(argv + ["--resume", "auto"])["final_step"] == 6


def test_temp_files_of_a_killed_save_are_removed_on_the_next_start(text_file, tmp_path):
    tmp_path.mkdir(exist_ok=True)
    stale = [tmp_path / ".last.pt.x8f2k1.tmp", tmp_path / ".summary.json.tmp"]
    for path in stale:
        path.write_bytes(b"half a checkpoint")
    (tmp_path / "keep.txt").write_text("not ours to delete")
    cli.main(pretrain_args(text_file, tmp_path, "--steps", "1"))
    assert not any(p.exists() for p in stale) and (tmp_path / "keep.txt").exists()


def test_help_shows_every_option_with_its_default(capsys):
    for stage in ("pretrain", "sft", "reward", "ppo", "sample", "make-preferences"):
        with pytest.raises(SystemExit):
            cli.main([stage, "--help"])
        text = capsys.readouterr().out
        assert "(default:" in text
    parser = cli.build_parser()
    ppo = parser._subparsers._group_actions[0].choices["ppo"]
    missing = [a.dest for a in ppo._actions if a.dest != "help" and not (a.help or "").strip()]
    assert not missing, f"ppo options without help: {missing}"
    assert any(a.dest == "batch_size" and a.default == 16 for a in parser._subparsers._group_actions[0]
               .choices["reward"]._actions)


@pytest.fixture(scope="module")
def base(tmp_path_factory, text_file):
    d = tmp_path_factory.mktemp("base")
    cli.main(pretrain_args(text_file, d, "--steps", "20", "--lr", "1e-2"))
    return d / "last.pt"


def test_sample_streams_the_continuation_of_a_prompt(base, capsys):
    texts = cli.main(["sample", "--init", str(base), "--prompt", "The cat\\n", "--max-new-tokens", "24"])
    out = capsys.readouterr().out
    assert len(texts) == 1 and out == "The cat\n" + texts[0] + "\n"   # streamed byte by byte, decoded alike
    again = cli.main(["sample", "--init", str(base), "--prompt", "The cat\\n", "--max-new-tokens", "24"])
    assert again == texts                                           # seeded: the same text again
    several = cli.main(["sample", "--init", str(base), "--prompt", "x", "--n", "3", "--top-k", "5", "--top-p",
                        "0.9", "--max-new-tokens", "8", "--temperature", "1.0"])
    assert len(several) == 3 and "--- sample 3 ---" in capsys.readouterr().out


def test_sample_reads_prompts_from_stdin_until_it_ends(base, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("first prompt\n\nsecond prompt\n"))
    texts = cli.main(["sample", "--init", str(base), "--max-new-tokens", "6", "--temperature", "0"])
    out = capsys.readouterr().out
    assert len(texts) == 2 and "first prompt" in out and "second prompt" in out  # the empty line is skipped


def test_sample_loads_the_policy_of_any_stage(base, tmp_path):
    demos = tmp_path / "demos.jsonl"
    demos.write_text("\n".join(json.dumps({"prompt": f"Q{i}: ", "response": "fine."}) for i in range(20)))
    cli.main(["sft", "--init", str(base), "--train", str(demos), "--steps", "2", "--max-len", "32", "--quiet",
              "--checkpoint-dir", str(tmp_path / "sft")])
    for init in (tmp_path / "sft" / "last.pt", tmp_path / "sft" / "model"):   # LoRA merged on loading
        assert len(cli.main(["sample", "--init", str(init), "--prompt", "Q1: ", "--max-new-tokens", "4"])) == 1
