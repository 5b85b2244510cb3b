"""The labelling page in a real browser (headless Chromium driven by Playwright): keyboard and mouse votes, undo,
a ranking, a demonstration, export into `train.py reward` / `train.py sft`, two annotators at once, and model output
full of markup shown as text, never run.

Needs Debian's chromium (`apt-get install chromium`) and `pip install -e ".[test]"` (playwright; no browser download:
Playwright drives the system Chromium). Skipped without them, unless PALM_RLHF_BROWSER=require (CI sets it).
"""

import json
import os
import shutil
import statistics
import time

import pytest
import torch

from palm_rlhf import PaLM, PaLMConfig
from palm_rlhf.feedback import load_demonstrations, load_preferences

from test_label import Server

CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
REQUIRED = os.environ.get("PALM_RLHF_BROWSER") == "require"
try:
    from playwright.sync_api import sync_playwright
except ImportError:
    sync_playwright = None
missing = ("playwright is not installed" if sync_playwright is None else
           None if os.path.exists(CHROMIUM) else f"no Chromium at {CHROMIUM} (apt-get install chromium)")
if missing and REQUIRED:
    raise RuntimeError(f"PALM_RLHF_BROWSER=require, but {missing}")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(missing is not None, reason=missing or "")]

# the flags a sandboxed root machine with no network needs (no background connections, no sandbox, no GPU)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
NASTY = ["<script>window.__pwned = 1; alert(1)</script>", '<img src=x onerror="window.__pwned = 2; alert(2)">',
         "&lt;b&gt;not bold&lt;/b&gt; &amp; <b>not bold either</b>", "tabs\tand\nnew lines  kept  "]


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield b
        b.close()


def open_page(browser, server, name):
    page = browser.new_context().new_page()
    page.dialogs = []
    page.on("dialog", lambda d: (page.dialogs.append(d.message), d.dismiss()))
    page.goto(server.url)
    page.fill("#login-name", name)
    page.press("#login-name", "Enter")
    page.wait_for_function("document.body.dataset.item")
    return page


def shown(page) -> dict:
    return page.evaluate("""() => ({id: document.body.dataset.item, a: document.getElementById('compare-a').textContent,
                                    b: document.getElementById('compare-b').textContent})""")


def next_item(page, old: str) -> None:
    page.wait_for_function("old => document.body.dataset.item && document.body.dataset.item !== old", arg=old)


def test_label_session_end_to_end(browser, tmp_path, capsys):
    torch.manual_seed(0)
    model = PaLM(PaLMConfig(num_tokens=256, dim=32, depth=1, heads=2, dim_head=16, max_seq_len=96)).save(
        tmp_path / "model")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"{i}: {NASTY[i % len(NASTY)]}"}) + "\n" for i in range(12)))
    server = Server(tmp_path, "--init", str(model), "--prompts", str(prompts), "--out", str(tmp_path / "fb"),
                    "--rank-size", "3", "--max-new-tokens", "24", "--overlap", "0", "--ahead", "24")
    try:
        page = open_page(browser, server, "alice")
        votes, walls = [], []
        keys = ["a", "b", "ArrowLeft", "ArrowRight", "t", "x", "s"] + ["a", "b"] * 6 + ["a"]   # 20 with the keyboard
        clicks = ["A is better", "B is better", "A is better"]                                # 3 with the mouse
        for how in keys + clicks:
            before = shown(page)
            t0 = time.perf_counter()
            if how in keys:
                page.keyboard.press(how)
            else:
                page.get_by_role("button", name=how).click()
            next_item(page, before["id"])
            walls.append(1000 * (time.perf_counter() - t0))
            votes.append((before, {"a": "A", "arrowleft": "A", "b": "B", "arrowright": "B", "t": "tie", "x": "bad",
                                   "s": "skip", "A is better": "A", "B is better": "B"}[how.lower() if how in keys
                                                                                          else how]))
        # undo the last vote: its item comes back as it was shown; then vote the other way
        last, _ = votes.pop()
        page.keyboard.press("u")
        page.wait_for_function("id => document.body.dataset.item === id", arg=last["id"])
        assert shown(page) == last
        page.keyboard.press("b")
        next_item(page, last["id"])
        votes.append((last, "B"))

        page.get_by_role("button", name="Rank").click()
        page.wait_for_selector(".rankable")
        rank_texts = page.locator(".rankable").all_text_contents()
        page.locator(".rankable").nth(1).click()
        page.keyboard.press("3")
        page.keyboard.press("1")
        page.keyboard.press("Backspace")                                          # take back the last pick ...
        page.locator(".rankable").nth(0).click()                                  # ... and pick it again
        rank_id = page.evaluate("document.body.dataset.item")
        page.keyboard.press("Enter")
        next_item(page, rank_id)

        page.get_by_role("button", name="Write").click()
        page.wait_for_function("document.getElementById('write-prompt').textContent")
        write_prompt = page.text_content("#write-prompt")
        page.fill("#write-text", "A demonstration, <i>typed</i> by hand.")
        page.press("#write-text", "Control+Enter")
        page.wait_for_function("document.getElementById('write-text').value === ''")

        page.get_by_role("button", name="Stats").click()
        page.get_by_role("button", name="Export preferences.jsonl and demos.jsonl").click()
        page.wait_for_function("document.getElementById('export-result').textContent")
        assert page.text_content("#export-result").startswith("20 pairs and 1 rankings")
        assert "alice" in page.text_content("#stats-table")
        timings = page.evaluate("window.labelTimings")
        if os.environ.get("PALM_RLHF_SCREENSHOT"):
            page.get_by_role("button", name="Compare").click()
            page.screenshot(path=os.environ["PALM_RLHF_SCREENSHOT"])
        assert page.dialogs == []
    finally:
        server.stop()

    events = [json.loads(line) for line in (tmp_path / "fb" / "events.jsonl").read_text().splitlines()]
    assert len(events) == 23 + 1 + 1 + 1 + 1                          # 23 votes, an undo, its re-vote, rank, write
    decisive = [(item, choice) for item, choice in votes if choice in "AB"]
    assert len(decisive) == 20
    rows = [json.loads(line) for line in (tmp_path / "fb" / "preferences.jsonl").read_text().splitlines()]
    chosen = {r["item"]: (r["chosen"], r["rejected"]) for r in rows if "chosen" in r}
    assert chosen == {item["id"]: (item["a"], item["b"]) if c == "A" else (item["b"], item["a"])
                      for item, c in decisive}                       # the side pressed is the response stored
    ranking = next(r["responses"] for r in rows if "responses" in r)
    assert ranking == [rank_texts[1], rank_texts[2], rank_texts[0]]
    assert load_demonstrations(tmp_path / "fb" / "demos.jsonl") == [
        {"prompt": write_prompt, "response": "A demonstration, <i>typed</i> by hand."}]
    assert len(load_preferences(tmp_path / "fb" / "preferences.jsonl")) == 20 + 3

    # the files are what the training stages take
    from palm_rlhf.cli import main
    prefs, demos = str(tmp_path / "fb" / "preferences.jsonl"), str(tmp_path / "fb" / "demos.jsonl")
    summary = main(["reward", "--init", str(model), "--train", prefs, "--steps", "3", "--batch-size", "4", "--quiet",
                    "--max-len", "256",
                    "--checkpoint-dir", str(tmp_path / "rm")])
    assert summary["final_step"] == 3 and len(summary["losses"]) == 3 and (tmp_path / "rm" / "model").is_dir()
    summary = main(["sft", "--init", str(model), "--train", demos, "--val", demos, "--steps", "2", "--quiet",
                    "--checkpoint-dir", str(tmp_path / "sft")])
    assert summary["final_step"] == 2 and (tmp_path / "sft" / "model").is_dir()
    with capsys.disabled():
        q = statistics.quantiles(timings, n=10)
        print(f"\nlabel page: next item on screen {statistics.median(timings):.1f} ms after a vote (median of "
              f"{len(timings)}; 90th percentile {q[-1]:.1f}, max {max(timings):.1f}; in-page, from the vote to the "
              f"frame showing the next item); "
              f"{statistics.median(walls):.0f} ms median as Playwright sees it (includes its round trips)")


def test_markup_is_shown_as_text_and_two_annotators_vote_at_once(browser, tmp_path):
    candidates = tmp_path / "candidates.jsonl"
    rows = [{"prompt": NASTY[i % 4], "responses": [NASTY[(i + j) % 4] + f" #{i}.{j}" for j in range(3)]}
            for i in range(32)]
    candidates.write_text("".join(json.dumps(r) + "\n" for r in rows))
    server = Server(tmp_path, "--candidates", str(candidates), "--out", str(tmp_path / "fb"), "--overlap", "1",
                    "--rank-size", "3")
    try:
        pages = [open_page(browser, server, name) for name in ("carol", "dave")]
        texts = {t for r in rows for t in [r["prompt"], *r["responses"]]}
        # each page votes on an item it fetched 2 votes earlier (it keeps 2 ahead), and whether a fetch finds the
        # other's vote already in is timing: 5 rounds made exactly 3 items of two labels (the bar), 8 make ~7; with
        # 32 rows, handing out fresh items first would make none (checked by swapping label.py's order)
        rounds = 8
        for round_ in range(rounds):                 # both keep voting; requests of the two overlap at the server
            before = [shown(p) for p in pages]
            for page, item in zip(pages, before):
                assert item["a"] in texts and item["b"] in texts       # the exact text, read back from the page
                assert page.text_content("#compare-prompt") in texts
                page.keyboard.press("a")
            for page, item in zip(pages, before):
                next_item(page, item["id"])
        page = pages[0]
        page.get_by_role("button", name="Rank").click()
        page.wait_for_selector(".rankable")
        assert set(page.locator(".rankable").all_text_contents()) <= texts
        page.get_by_role("button", name="Write").click()
        page.wait_for_function("document.getElementById('write-model').textContent")
        assert page.text_content("#write-model") in texts
        for p in pages:
            assert p.evaluate("window.__pwned") is None                # no script or handler from the data ran
            assert p.locator("main img, main script, main b").count() == 0   # no element from the data was made
            assert p.dialogs == []
        stats = server.call("api/stats")[1]
        assert stats["annotators"] == {"carol": {"preferred": rounds}, "dave": {"preferred": rounds}}
        assert stats["agreement"]["items"] >= 3                        # second opinions were handed out first
    finally:
        server.stop()
    events = [json.loads(line) for line in (tmp_path / "fb" / "events.jsonl").read_text().splitlines()]
    assert len(events) == 2 * rounds and len({(e["annotator"], e["item"]) for e in events}) == 2 * rounds
