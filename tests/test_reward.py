"""Reward model, SFT and the demo-task stages: losses by hand, padding invariance, real short runs, resume."""

import json
import random

import pytest
import torch

from palm_rlhf import LoRAConfig, PaLM, PaLMConfig, RewardModel, cli
from palm_rlhf.checkpoint import read_training_state
from palm_rlhf.demo import corpus_preferences
from palm_rlhf.judges import prose
from palm_rlhf.feedback import collate, encode
from palm_rlhf.reward import bradley_terry_loss, last_real_index


@pytest.fixture(scope="module")
def base_ckpt(tmp_path_factory, text_file):
    d = tmp_path_factory.mktemp("base")
    cli.main(["pretrain", "--preset", "test", "--data", str(text_file), "--steps", "30", "--seq-len", "64",
                "--batch-size", "8", "--lr", "3e-3", "--eval-interval", "30", "--eval-batches", "1",
                "--sample-interval", "0", "--checkpoint-dir", str(d), "--quiet"])
    return d / "last.pt", text_file


def test_bradley_terry_by_hand():
    chosen, rejected = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0])
    want = (-torch.log(torch.sigmoid(torch.tensor(1.0))) - torch.log(torch.tensor(0.5))) / 2
    torch.testing.assert_close(bradley_terry_loss(chosen, rejected), want)
    with_margin = -torch.log(torch.sigmoid(torch.tensor([0.5, -0.5]))).mean()
    torch.testing.assert_close(bradley_terry_loss(chosen, rejected, margin=0.5), with_margin)


def test_last_real_index():
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 1], [0, 1, 1, 0]], dtype=torch.bool)
    assert last_real_index(mask).tolist() == [1, 3, 2]


@pytest.mark.parametrize("pool", ["last", "sum"])
def test_scores_are_padding_invariant_and_deterministic(pool):
    torch.manual_seed(0)
    rm = RewardModel(PaLM(PaLMConfig.preset("test")), lora=LoRAConfig(r=4), pool=pool).eval()
    torch.nn.init.normal_(rm.head.weight)  # a non-trivial head
    torch.nn.init.normal_(rm.segment_emb.weight)
    items = [encode("prompt", "a response", 64), encode("p", "x", 64), encode("a long prompt here", "yes", 64)]
    batch = collate(items)
    together = rm.score(batch["tokens"], batch["mask"], batch["response_mask"])
    for i, item in enumerate(items):
        alone = collate([item])
        torch.testing.assert_close(rm.score(alone["tokens"], alone["mask"], alone["response_mask"]),
                                   together[i:i + 1], atol=1e-5, rtol=1e-5)
    again = rm.score(batch["tokens"], batch["mask"], batch["response_mask"])
    assert torch.equal(together, again)
    # left-padded prompt + right-padded response (the PPO layout) scores the same too
    t, m, r = batch["tokens"][1:2], batch["mask"][1:2], batch["response_mask"][1:2]
    pad = torch.zeros(1, 3, dtype=torch.long)
    left = rm.score(torch.cat((pad, t), 1), torch.cat((pad.bool(), m), 1), torch.cat((pad.bool(), r), 1))
    torch.testing.assert_close(left, together[1:2], atol=1e-5, rtol=1e-5)


def test_summed_head_is_the_sum_of_per_token_scores_over_the_response(tmp_path):
    torch.manual_seed(0)
    rm = RewardModel(PaLM(PaLMConfig.preset("test")), lora=LoRAConfig(r=4), pool="sum").eval()
    torch.nn.init.normal_(rm.head.weight)
    torch.nn.init.normal_(rm.head.bias)
    b = collate([encode("prompt", "a response", 64), encode("p", "xy", 64)])
    hidden = rm.palm(b["tokens"], mask=b["mask"], return_hidden=True,
                     extra_embed=rm.segment_emb(b["response_mask"].long()))
    for i in range(2):
        rows = hidden[i][b["response_mask"][i]]
        torch.testing.assert_close(rm.score(b["tokens"], b["mask"], b["response_mask"])[i],
                                   (rows @ rm.head.weight[0]).sum() + rm.head.bias[0], atol=1e-5, rtol=1e-5)
    rm.save(tmp_path / "rm")
    again = RewardModel.load(tmp_path / "rm")
    assert again.pool == "sum"
    torch.testing.assert_close(again.score(b["tokens"], b["mask"], b["response_mask"]),
                               rm.score(b["tokens"], b["mask"], b["response_mask"]))
    with pytest.raises(ValueError, match="pool"):
        RewardModel(PaLM(PaLMConfig.preset("test")), pool="mean")


def test_rating_bins_score_is_the_expected_rating():
    torch.manual_seed(0)
    rm = RewardModel(PaLM(PaLMConfig.preset("test")), lora=LoRAConfig(r=0), num_bins=3, bin_values=[1.0, 2.0, 5.0])
    with torch.no_grad():
        rm.head.bias.copy_(torch.tensor([0.0, 0.0, 100.0]))
    b = collate([encode("p", "r", 16)])
    assert rm.score(b["tokens"], b["mask"], b["response_mask"]).item() == pytest.approx(5.0)


def easy_preferences(path, n, seed):
    """chosen: letters and spaces; rejected: markup-heavy digits. Easy to tell apart."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt = "".join(rng.choice("abcdefgh ") for _ in range(8))
        good = " ".join("".join(rng.choice("aeioust") for _ in range(4)) for _ in range(3))
        bad = "".join(rng.choice("0123456789|[]{}=") for _ in range(14))
        rows.append({"prompt": prompt, "chosen": good, "rejected": bad})
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def reward_args(base, tmp, ckpt, *extra):
    return ["reward", "--init", str(base), "--train", str(easy_preferences(tmp / "pairs.jsonl", 240, 0)),
            "--max-len", "48", "--batch-size", "8", "--lr", "3e-3", "--warmup", "2", "--eval-interval", "10",
            "--checkpoint-dir", str(ckpt), "--quiet", "--gold", *extra]


def test_reward_model_learns_an_easy_preference(base_ckpt, tmp_path):
    out = cli.main(reward_args(base_ckpt[0], tmp_path, tmp_path / "rm", "--steps", "40"))
    assert out["val_acc"] >= 0.95 and out["val_gold_acc"] >= 0.95, out
    assert out["gold_label_agreement"] == 1.0
    bins = out["gold_acc_by_gap"]  # accuracy in three equal-count bins of the gold gap, smallest gaps first
    assert len(bins) == 3 and sum(b["pairs"] for b in bins) == 24 and bins[0]["gap_to"] <= bins[2]["gap_from"]
    assert sum(b["accuracy"] * b["pairs"] for b in bins) / 24 == pytest.approx(out["val_gold_acc"])
    assert (tmp_path / "rm" / "reward.png").is_file()
    state = read_training_state(tmp_path / "rm" / "last.pt", stage="reward")
    assert state["model_config"]["kind"] == "reward_model" and state["model_config"]["lora"]["r"] == 8
    assert state["trainer_config"]["objective"] == "pairwise"    # the config dataclass, not argparse's namespace
    rm = RewardModel.load(tmp_path / "rm" / "model")              # the exported model rebuilds from the file alone
    rows = [json.loads(x) for x in easy_preferences(tmp_path / "fresh.jsonl", 20, seed=9).read_text().splitlines()]
    score = lambda key: rm.score(**collate([encode(r["prompt"], r[key], 48) for r in rows]))  # noqa: E731
    assert (score("chosen") > score("rejected")).float().mean() >= 0.9  # it is the trained model
    assert PaLM.load(tmp_path / "rm" / "last.pt").config.dim == 32  # the trunk loads as a plain PaLM


def test_reward_resume_equals_uninterrupted(base_ckpt, tmp_path):
    full = cli.main(reward_args(base_ckpt[0], tmp_path, tmp_path / "a", "--steps", "6"))
    cut = cli.main(reward_args(base_ckpt[0], tmp_path, tmp_path / "b", "--steps", "6", "--stop-after", "2"))
    rest = cli.main(reward_args(base_ckpt[0], tmp_path, tmp_path / "b", "--steps", "6", "--resume", "auto"))
    assert cut["losses"] + rest["losses"] == full["losses"]


@pytest.mark.parametrize("lora_r", ["4", "0"])
def test_sft_learns_and_writes_a_merged_model(base_ckpt, tmp_path, lora_r):
    rows = [{"prompt": f"Q{i % 7}: ", "response": "always answer politely."} for i in range(64)]
    demos = tmp_path / "demos.jsonl"
    demos.write_text("\n".join(json.dumps(r) for r in rows))
    args = ["sft", "--init", str(base_ckpt[0]), "--train", str(demos), "--max-len", "40", "--batch-size", "8",
            "--lr", "1e-2", "--warmup", "2", "--eval-interval", "15", "--lora-r", lora_r, "--quiet",
            "--checkpoint-dir", str(tmp_path / "sft")]
    out = cli.main(args + ["--steps", "30"])
    first = json.loads((tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    # full fine-tuning learns the reply fast (3.76 -> 1.95 nats on enwik6); a rank-4 adapter on a 30-step toy base
    # cannot sharpen its logits much (the tied embeddings are frozen and tiny), so it only has to move clearly
    # (3.76 -> 3.70). The base now finishes its warm-up (capped at half the run), so it starts sharper than it did.
    target = first - 1.5 if lora_r == "0" else first - 0.04
    assert out["val_loss"] < target, (first, out["val_loss"])
    merged = PaLM.load(tmp_path / "sft" / "model")
    held_out = rows[-6:]  # --val-fraction 0.1 of 64: the last 6, one evaluation batch
    b = collate([encode(r["prompt"], r["response"], 40) for r in held_out])
    with torch.no_grad():
        logits = merged(b["tokens"][:, :-1], mask=b["mask"][:, :-1])
    from palm_rlhf import next_token_loss
    merged_loss = next_token_loss(logits, b["tokens"][:, 1:], b["response_mask"][:, 1:]).item()
    assert merged_loss == pytest.approx(out["val_loss"], abs=1e-4)  # the merged model is the trained one
    from_training_state = PaLM.load(tmp_path / "sft" / "last.pt")  # the adapter merged on loading, too
    for name, tensor in merged.state_dict().items():
        torch.testing.assert_close(from_training_state.state_dict()[name], tensor)


def test_make_preferences_writes_labelled_pairs(base_ckpt, tmp_path):
    ckpt, data = base_ckpt
    stats = cli.main(["make-preferences", "--init", str(ckpt), "--data", str(data), "--out", str(tmp_path),
                        "--pairs", "20", "--val-pairs", "6", "--demos", "5", "--prompt-len", "16",
                        "--response-len", "24", "--min-gap", "0.0", "--flip", "0.0", "--quiet"])
    train_rows = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    assert len(train_rows) == 20 and stats["labels_flipped"] == 0
    assert all(prose(r["chosen"]) >= prose(r["rejected"]) for r in train_rows)
    assert len((tmp_path / "val.jsonl").read_text().splitlines()) == 6
    assert len((tmp_path / "demos.jsonl").read_text().splitlines()) == 5


def test_make_preferences_labels_every_pair_of_several_responses(base_ckpt, tmp_path):
    ckpt, data = base_ckpt
    stats = cli.main(["make-preferences", "--init", str(ckpt), "--data", str(data), "--out", str(tmp_path),
                      "--pairs", "30", "--val-pairs", "6", "--demos", "1", "--prompt-len", "16", "--response-len",
                      "24", "--min-gap", "0.0", "--flip", "0.0", "--per-prompt", "4", "--batch-size", "16",
                      "--judge", "prose", "--quiet"])
    rows = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    by_prompt = {}
    for r in rows:
        by_prompt.setdefault(r["prompt"], set()).update((r["chosen"], r["rejected"]))
    assert len(rows) == 30 and stats["pairs_drawn"] == 36 and max(len(v) for v in by_prompt.values()) <= 4
    assert max(sum(r["prompt"] == p for r in rows) for p in by_prompt) == 6  # 4 responses: all 6 pairs kept
    with pytest.raises(cli.CLIError, match="--batch-size 10: must be a multiple of per_prompt"):
        cli.main(["make-preferences", "--init", str(ckpt), "--per-prompt", "4", "--batch-size", "10"])


def test_corpus_pairs_are_real_continuations_the_judge_ranks(base_ckpt, tmp_path):
    ckpt, _ = base_ckpt
    rng = random.Random(0)                                    # prose and wiki markup, so the prose judge has a say
    data = tmp_path / "corpus.txt"
    data.write_text(" ".join(rng.choice(["the", "river", "city", "[[Paris]]", "{{cite}}", "|", "=", "of", "and"])
                             for _ in range(20000)))
    stats = cli.main(["make-preferences", "--init", str(ckpt), "--data", str(data), "--out", str(tmp_path / "p"),
                      "--pairs", "10", "--val-pairs", "4", "--demos", "1", "--prompt-len", "16", "--response-len",
                      "24", "--flip", "0.0", "--corpus-pairs", "25", "--quiet"])
    rows = [json.loads(line) for line in (tmp_path / "p" / "train.jsonl").read_text().splitlines()]
    assert len(rows) == 35 and stats["train"] == 35
    text = data.read_text()
    assert sum(r["chosen"] in text and r["rejected"] in text and r["prompt"] in text for r in rows) >= 25
    assert all(prose(r["chosen"]) - prose(r["rejected"]) >= 0.05 - 1e-9 for r in rows)   # judged, ties skipped
    assert len((tmp_path / "p" / "val.jsonl").read_text().splitlines()) == 4   # held-out pairs stay sampled ones
    plain = torch.tensor(list(b"plain words only " * 400))           # every window scores the same: all ties
    with pytest.raises(ValueError, match="called 1024 of 1024 corpus pairs a tie"):
        corpus_preferences(plain, pairs=5, judge=prose)


def test_gold_score_prefers_clean_prose():
    assert prose("the cat sat on the mat") > prose("[[the|cat]] {{sat}}")
    assert prose("plain words here") == pytest.approx(1.0)
    assert prose("") == 0.0
