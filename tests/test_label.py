"""The labelling app's store and server: labels map to the right responses, nothing is lost or written twice (replays,
unknown items, concurrent voters, SIGKILL, a torn log line), restart resumes, exports load in reward / SFT.
The real-browser tests are in test_label_browser.py."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from palm_rlhf import PaLM, PaLMConfig
from palm_rlhf.feedback import load_demonstrations, load_preferences
from palm_rlhf.label import (FileCandidates, LabelConfig, LabelError, LabelStore, SampledCandidates, reward_scorer,
                             serve)

ROOT = Path(__file__).resolve().parent.parent


def candidates(path: Path, rows: int = 30, k: int = 4) -> Path:
    path.write_text("".join(json.dumps({"prompt": f"prompt {i}", "responses": [f"r{i}-{j}" for j in range(k)]}) + "\n"
                            for i in range(rows)))
    return path


def filled(tmp_path, kinds=("compare",), n=6, **kw) -> LabelStore:
    store = LabelStore(tmp_path / "fb", **kw)
    source = FileCandidates(candidates(tmp_path / "c.jsonl"), LabelConfig(rank_size=3))
    for kind in kinds:
        store.add_items(kind, source.make(kind, 0, n, {"compare": 2, "rank": 3, "write": 1}[kind]))
    return store


def test_labels_map_to_the_responses_shown_and_export_loads(tmp_path):
    store = filled(tmp_path, kinds=("compare", "rank", "write"))
    shown = {}
    for choice in ("A", "B", "tie", "bad", "skip", "A"):
        item = store.next("ann", "compare")["item"]
        shown[item["id"]] = item
        store.label("ann", item["id"], choice, item["order"])
    rank = store.next("ann", "rank")["item"]
    store.label("ann", rank["id"], "rank", rank["order"], ranking=[2, 0, 1])      # positions as shown, best first
    write = store.next("ann", "write")["item"]
    store.label("ann", write["id"], "write", write["order"], text="a better <b>one</b>\n")
    summary = store.export()
    assert (summary["pairs"], summary["rankings"], summary["demonstrations"]) == (3, 1, 1)
    assert summary["left_out"] == {"tie": 1, "bad": 1, "skip": 1}

    pairs = load_preferences(summary["preferences"])
    decisive = [(i, e["choice"]) for i, e in ((i, store.labels[i]["ann"]) for i in shown) if e["choice"] in "AB"]
    expected = [{"prompt": shown[i]["prompt"], "chosen": shown[i]["responses"]["AB".index(c)],
                 "rejected": shown[i]["responses"][1 - "AB".index(c)]} for i, c in decisive]
    shown_rank = rank["responses"]
    ranked = [shown_rank[2], shown_rank[0], shown_rank[1]]
    expected += [{"prompt": rank["prompt"], "chosen": a, "rejected": b}
                 for a, b in ((ranked[0], ranked[1]), (ranked[0], ranked[2]), (ranked[1], ranked[2]))]
    assert pairs == expected
    assert load_demonstrations(summary["demos"]) == [{"prompt": write["prompt"], "response": "a better <b>one</b>\n"}]


def test_refused_requests_write_nothing(tmp_path):
    store = filled(tmp_path)
    item = store.next("ann", "compare")["item"]
    store.label("ann", item["id"], "A", item["order"])
    log = tmp_path / "fb" / "events.jsonl"
    size = log.stat().st_size
    cases = [(409, lambda: store.label("ann", item["id"], "B", item["order"])),           # replayed / second label
             (404, lambda: store.label("ann", "compare-999", "A", [0, 1])),               # unknown item
             (400, lambda: store.label("other", item["id"], "rank", item["order"])),       # wrong kind of label
             (400, lambda: store.label("other", item["id"], "A", [0, 0])),                # not the order shown
             (400, lambda: store.label("<script>", item["id"], "A", [0, 1])),             # not a name
             (400, lambda: store.next("ann", "nonsense")),
             (409, lambda: store.undo("nobody"))]
    for status, call in cases:
        with pytest.raises(LabelError) as err:
            call()
        assert err.value.status == status, err.value
    assert log.stat().st_size == size


def test_undo_brings_the_item_back_in_the_same_order(tmp_path):
    store = filled(tmp_path)
    item = store.next("ann", "compare")["item"]
    store.label("ann", item["id"], "A", item["order"])
    back = store.undo("ann")["item"]
    assert back == item
    assert store.next("ann", "compare")["item"] == item                 # still held by ann, offered again
    store.label("ann", item["id"], "B", item["order"])
    assert store.export()["pairs"] == 1
    assert load_preferences(tmp_path / "fb" / "preferences.jsonl")[0]["chosen"] == item["responses"][1]


def test_restart_resumes_and_skips_a_torn_line(tmp_path):
    store = filled(tmp_path)
    first = store.next("ann", "compare")["item"]
    store.label("ann", first["id"], "A", first["order"])
    held = store.next("ann", "compare")["item"]                          # shown, not labelled when the server dies
    store.close()
    log = tmp_path / "fb" / "events.jsonl"
    with open(log, "ab") as f:
        f.write(b'{"type": "label", "annotator": "ann", "item": "compa')  # a write cut off by SIGKILL
    with pytest.warns(UserWarning, match="events.jsonl:2: skipped"):
        store = LabelStore(tmp_path / "fb")
    assert store.labels[first["id"]]["ann"]["choice"] == "A"
    again = store.next("ann", "compare")["item"]
    assert again["id"] == held["id"]                                       # the oldest unlabelled item comes first
    store.label("ann", again["id"], "B", again["order"])
    store.close()
    lines = log.read_bytes().split(b"\n")
    assert json.loads(lines[-2])["item"] == again["id"]                    # appended on a fresh line
    with pytest.warns(UserWarning):
        store = LabelStore(tmp_path / "fb")
    assert sum(map(len, store.history.values())) == 2
    ids = {store.next("ann", "compare", holding=set())["item"]["id"]}
    assert not ids & {first["id"], held["id"]}


def test_second_opinions_and_agreement(tmp_path):
    store = filled(tmp_path, overlap=1.0)                                  # every item wants two annotators
    for choice in ("A", "B", "tie"):
        item = store.next("ann", "compare")["item"]
        store.label("ann", item["id"], choice, item["order"])
    verdicts = []
    for _ in range(3):
        item = store.next("bob", "compare")["item"]
        assert "ann" in store.labels[item["id"]]                           # second opinions come first
        verdicts.append(store.labels[item["id"]]["ann"])
        # bob agrees with ann on the first, disagrees on the second, calls the third a tie too
        winner = {0: verdicts[-1].get("winner"), 1: 1 - verdicts[-1].get("winner", 0), 2: None}[len(verdicts) - 1]
        choice = "tie" if winner is None else "AB"[item["order"].index(winner)]
        store.label("bob", item["id"], choice, item["order"])
    stats = store.stats(score=lambda prompt, responses: [len(r) + (r.endswith("1")) for r in responses])
    assert stats["annotators"] == {"ann": {"preferred": 2, "tie": 1}, "bob": {"preferred": 2, "tie": 1}}
    assert stats["agreement"] == {"items": 3, "same": 2, "decisive_items": 2, "decisive_same": 1}
    wins = [e for per in store.labels.values() for e in per.values() if "winner" in e]
    assert stats["reward_model"] == {"pairs": 4, "agree": sum(e["winner"] == 1 for e in wins)}
    assert store.next("ann", "compare")["item"]["id"] not in {v["item"] for v in verdicts}


def test_concurrent_voters_each_vote_once(tmp_path):
    store = filled(tmp_path, n=30)
    errors = []

    def annotate(name):
        try:
            for _ in range(12):
                item = store.next(name, "compare")["item"]
                store.label(name, item["id"], "A", item["order"])
        except Exception as err:  # noqa: BLE001  surfaced below
            errors.append(err)
    threads = [threading.Thread(target=annotate, args=(f"ann{i}",)) for i in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors
    events = [json.loads(line) for line in (tmp_path / "fb" / "events.jsonl").read_text().splitlines()]
    assert len(events) == 24 and len({e["item"] for e in events}) == 24   # nobody was handed another's item


def test_sampled_candidates_use_the_model(tmp_path):
    torch.manual_seed(0)
    model = PaLM(PaLMConfig(num_tokens=256, dim=32, depth=1, heads=2, dim_head=16, max_seq_len=64))
    cfg = LabelConfig(max_new_tokens=12, batch=3, seed=1)
    source = SampledCandidates(model, ["alpha ", "beta ", "gamma ", "delta "], cfg)
    rows = source.make("rank", 0, 3, 4)
    assert [r["prompt"] for r in rows] == [["alpha ", "beta ", "gamma ", "delta "][r["source"]] for r in rows]
    assert len({r["source"] for r in rows}) == 3 and all(len(r["responses"]) == 4 for r in rows)
    assert all(len(t.encode("utf-8", "replace")) >= 1 for r in rows for t in r["responses"])
    assert source.make("rank", 0, 3, 4) == rows                             # a restart re-creates nothing new
    assert source.make("rank", 3, 3, 4)[0]["responses"] != rows[0]["responses"]


def test_reward_scorer_scores_each_response_on_its_prompt():
    from palm_rlhf.feedback import collate, encode
    from palm_rlhf.reward import RewardModel
    torch.manual_seed(0)
    rm = RewardModel(PaLM(PaLMConfig(num_tokens=256, dim=32, depth=1, heads=2, dim_head=16, max_seq_len=64)))
    scores = reward_scorer(rm)("a prompt ", ["short", "a longer response"])
    alone = [rm.score(**collate([encode("a prompt ", r, 64)])).item() for r in ("short", "a longer response")]
    assert scores == pytest.approx(alone, abs=1e-5)


def test_network_exposure_needs_a_token(tmp_path):
    with pytest.raises(ValueError, match="--token"):
        serve(LabelStore(tmp_path / "fb"), None, LabelConfig(), host="0.0.0.0")

# ------------------------------------------------------------------------------------------------ a real server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`train.py label` in a subprocess, spoken to over HTTP."""

    def __init__(self, tmp_path, *args):
        self.port = free_port()
        self.log = open(tmp_path / f"server-{self.port}.log", "w+")
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "label", "--port", str(self.port),
                                      *args], stdout=self.log, stderr=subprocess.STDOUT, cwd=tmp_path)
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(self.url, timeout=1)
                return
            except (urllib.error.URLError, ConnectionError):
                if self.proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"the server did not start:\n{self.output()}")
                time.sleep(0.2)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def call(self, path: str, body=None, headers=None):
        request = urllib.request.Request(self.url + path.lstrip("/"), method="GET" if body is None else "POST",
                                         data=None if body is None else json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(request, timeout=30) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    def next(self, annotator):
        for _ in range(100):
            status, body = self.call("api/next", {"annotator": annotator, "kind": "compare"})
            if body.get("item"):
                return body["item"]
            time.sleep(0.1)
        raise AssertionError(body)

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def stop(self, sig=signal.SIGINT) -> str:
        self.proc.send_signal(sig)
        self.proc.wait(timeout=30)
        return self.output()


@pytest.mark.slow
def test_server_survives_sigkill_and_concurrent_voters(tmp_path):
    args = ("--candidates", str(candidates(tmp_path / "c.jsonl", rows=40)), "--out", str(tmp_path / "fb"))
    server = Server(tmp_path, *args)
    voted, errors = {}, []

    def annotate(name):
        try:
            for _ in range(8):
                item = server.next(name)
                status, body = server.call("api/label", {"annotator": name, "item": item["id"], "choice": "B",
                                                         "order": item["order"]})
                assert status == 200, body
                voted[(name, item["id"])] = item["responses"][1]
        except Exception as err:  # noqa: BLE001
            errors.append(err)
    threads = [threading.Thread(target=annotate, args=(f"ann{i}",)) for i in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors, errors
    held = server.next("ann0")                                               # shown, never labelled
    server.stop(signal.SIGKILL)
    with open(tmp_path / "fb" / "events.jsonl", "ab") as f:
        f.write(b'{"type": "label", "annot')                                 # as if killed mid-write

    server = Server(tmp_path, *args)
    status, body = server.call("api/next", {"annotator": "ann0", "kind": "compare"})
    assert body["item"]["id"] == held["id"]
    ann, item = next(iter(voted))
    status, body = server.call("api/label", {"annotator": ann, "item": item, "choice": "A", "order": [0, 1]})
    assert status == 409, body                                               # a replay: refused, nothing written
    status, body = server.call("api/label", {"annotator": ann, "item": "compare-999", "choice": "A", "order": [0, 1]})
    assert status == 404, body
    vote = {"annotator": "ann0", "item": held["id"], "choice": "A", "order": held["order"]}
    assert server.call("api/label", vote, headers={"Content-Type": "text/plain"})[0] == 415   # a cross-site form
    assert server.call("api/label", vote, headers={"Host": "attacker.example"})[0] == 403     # DNS rebinding
    status, body = server.call("api/label", vote)
    assert status == 200, body
    out = server.stop()
    assert "skipped a line that is not a complete JSON object" in out
    assert "exported 17 pairs" in out
    pairs = load_preferences(tmp_path / "fb" / "preferences.jsonl")
    assert len(pairs) == 17
    chosen = {(p["annotator"], p["item"]): p["chosen"] for p in map(json.loads, open(tmp_path / "fb" /
                                                                                          "preferences.jsonl"))}
    assert {k: chosen[k] for k in voted} == voted


@pytest.mark.slow
def test_token_guards_the_api(tmp_path):
    server = Server(tmp_path, "--candidates", str(candidates(tmp_path / "c.jsonl")), "--out", str(tmp_path / "fb"),
                    "--token", "s3cret")
    try:
        assert server.call("api/stats")[0] == 403
        assert server.call("api/stats", headers={"X-Label-Token": "wrong"})[0] == 403
        status, body = server.call("api/stats", headers={"X-Label-Token": "s3cret"})
        assert status == 200 and body["labelled"] == 0
        assert "?token=s3cret" in server.output()
    finally:
        server.stop()
    assert not (tmp_path / "fb" / "events.jsonl").read_text()


def test_export_only_cli(tmp_path, capsys):
    from palm_rlhf.cli import main
    store = filled(tmp_path)
    item = store.next("ann", "compare")["item"]
    store.label("ann", item["id"], "A", item["order"])
    store.close()
    summary = main(["label", "--out", str(tmp_path / "fb"), "--export"])
    assert summary["pairs"] == 1 and "1 pairs" in capsys.readouterr().out
    from palm_rlhf.cli import CLIError
    with pytest.raises(CLIError, match="--candidates"):
        main(["label", "--out", str(tmp_path / "fb"), "--prompts", "p.jsonl"])
    assert os.path.exists(tmp_path / "fb" / "preferences.jsonl")
