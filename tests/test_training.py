"""train.py pretraining: end to end, checkpoints, resume exactness, atomic writes, bad checkpoints."""

import json

import pytest
import torch

import palm_rlhf
from palm_rlhf import PaLM, cli
from palm_rlhf.checkpoint import read_training_state
from palm_rlhf.metrics import MetricsLog
from palm_rlhf.training import lr_at
from palm_rlhf.utils import atomic_torch_save


def args(text_file, ckpt, *extra):
    return ["pretrain", "--preset", "test", "--data", str(text_file), "--seq-len", "32", "--batch-size", "4",
            "--eval-interval", "4", "--eval-batches", "2", "--sample-interval", "0", "--warmup", "2",
            "--checkpoint-dir", str(ckpt), "--quiet", *extra]


def test_pretrain_end_to_end_learns(text_file, tmp_path):
    out = cli.main(args(text_file, tmp_path, "--steps", "40", "--lr", "3e-3", "--sample-interval", "20",
                          "--sample-tokens", "8"))
    assert out["final_step"] == 40 and out["val_bpc"] < 6.0  # from 8 bits (uniform) toward text statistics
    assert sum(out["losses"][-5:]) / 5 < sum(out["losses"][:5]) / 5 - 0.5
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 41)) and "val_bpc" in rows[3]
    assert (tmp_path / "pretrain.png").stat().st_size > 1000
    model = PaLM.load(tmp_path / "last.pt")
    assert model.config.dim == 32


def test_resume_equals_uninterrupted(text_file, tmp_path):
    full = cli.main(args(text_file, tmp_path / "full", "--steps", "8", "--grad-accum", "2"))
    first = cli.main(args(text_file, tmp_path / "cut", "--steps", "8", "--grad-accum", "2", "--stop-after", "3"))
    assert first["final_step"] == 3
    rest = cli.main(args(text_file, tmp_path / "cut", "--steps", "8", "--grad-accum", "2", "--resume", "auto"))
    assert first["losses"] + rest["losses"] == full["losses"]  # bit-exact on CPU
    a = read_training_state(tmp_path / "full" / "last.pt", "pretrain")
    b = read_training_state(tmp_path / "cut" / "last.pt", "pretrain")
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    assert a["step"] == b["step"] == 8


def test_bad_checkpoints_give_clear_errors(text_file, tmp_path):
    cli.main(args(text_file, tmp_path, "--steps", "2"))
    good = (tmp_path / "last.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(good[: len(good) // 2])
    with pytest.raises(RuntimeError, match="truncated, corrupt"):
        palm_rlhf.load(tmp_path / "truncated.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(RuntimeError, match="corrupt or not a PyTorch file"):
        palm_rlhf.load(tmp_path / "garbage.pt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        palm_rlhf.load(tmp_path / "missing.pt")
    torch.save({"format": 1, "model": {}, "evil": Evil()}, tmp_path / "pickled.pt")
    with pytest.raises(RuntimeError, match="objects other than tensors") as err:
        palm_rlhf.load(tmp_path / "pickled.pt")
    assert "weights_only=False" not in str(err.value)  # never advise running a foreign file's code
    torch.save({"hello": torch.zeros(1)}, tmp_path / "foreign.pt")
    with pytest.raises(RuntimeError, match="not a palm-rlhf checkpoint"):
        palm_rlhf.load(tmp_path / "foreign.pt")
    with pytest.raises(RuntimeError, match="'pretrain' checkpoint, but this is the 'sft' stage"):
        read_training_state(tmp_path / "last.pt", stage="sft")
    with pytest.raises(ValueError, match="holds a 'palm', not a 'reward_model'"):
        palm_rlhf.RewardModel.load(tmp_path / "last.pt")


class Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_interrupted_save_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    atomic_torch_save({"v": torch.ones(3)}, path)

    def crash(obj, f, *a, **k):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        atomic_torch_save({"v": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=True)["v"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left behind


def test_cli_errors(text_file, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        cli.main(args(tmp_path / "nope.txt", tmp_path, "--steps", "1"))
    with pytest.raises(ValueError, match="exceeds the model's max_seq_len"):
        cli.main(args(text_file, tmp_path, "--steps", "1", "--seq-len", "4096"))
    with pytest.raises(ValueError, match="not a PaLMConfig field"):
        cli.main(args(text_file, tmp_path, "--steps", "1", "--model", "width=3"))


def test_lr_schedule():
    assert lr_at(0, lr=1.0, warmup=10, total=100) == pytest.approx(0.1)
    assert lr_at(9, lr=1.0, warmup=10, total=100) == pytest.approx(1.0)
    assert lr_at(100, lr=1.0, warmup=10, total=100, min_ratio=0.1) == pytest.approx(0.1)
    assert lr_at(55, lr=1.0, warmup=10, total=100, min_ratio=0.0) == pytest.approx(0.5)


def test_model_overrides_reach_the_config(text_file, tmp_path):
    cli.main(args(text_file, tmp_path, "--steps", "1", "--model", "qk_norm=true", "depth=1"))
    cfg = PaLM.load(tmp_path / "last.pt").config.to_dict()
    assert cfg["qk_norm"] is True and cfg["depth"] == 1


def test_metrics_log_resume_keeps_rows_up_to_the_checkpoint_and_a_fresh_run_starts_afresh(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path)
    for step in (1, 2, 3):
        log.write(step=step, loss=float(step))
    with open(path, "a") as f:
        f.write('{"step": 4, "lo')  # torn by a crash mid-write
    resumed = MetricsLog(path, start=2)
    assert resumed.series("loss") == ([1, 2], [1.0, 2.0])
    resumed.write(step=3, loss=30.0)
    assert [json.loads(x)["loss"] for x in path.read_text().splitlines()] == [1.0, 2.0, 30.0]
    assert MetricsLog(path).rows == [] and path.read_text() == ""
