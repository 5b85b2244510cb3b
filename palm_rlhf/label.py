"""Human feedback in a browser: people compare, rank and write responses; their choices train the reward model.

    python train.py label --init CKPT --prompts prompts.jsonl --out feedback/     # responses sampled from CKPT
    python train.py label --candidates responses.jsonl --out feedback/            # responses of any system

serves one page on http://127.0.0.1:8765 with three tasks: Compare (two responses: A better / B better / tie / both
bad / skip), Rank (k responses, best first) and Write (a better response, kept as an SFT demonstration).

Everything lives in the --out folder:
    items.jsonl        every item before it is shown: {"id", "kind", "prompt", "responses", "source"}
    events.jsonl       append-only, one line per label or undo: who, when, which item, the order shown, the choice
    preferences.jsonl  the export, what `train.py reward --train` reads: a pair per decisive comparison
                       {"prompt", "chosen", "rejected"} and a ranked list per ranking {"prompt", "responses"}
    demos.jsonl        the export, what `train.py sft --train` reads: {"prompt", "response"} per written response
Ties, "both bad" and skips stay in the log and are left out of the export (they say no response is preferred).
An item that two annotators label gives two rows.

No vote is lost or written twice: each line is fsynced before the browser hears "ok"; a second label of one item by
one annotator (a replayed request) is refused with 409, an unknown item with 404, and nothing is written; a torn last
line (the server killed mid-write) is skipped with a warning on restart. On restart, labelling resumes where it
stopped: labelled items are never shown again, items shown but not labelled are offered first.

The server is Starlette on uvicorn (`pip install -e ".[label]"`): the framework FastAPI is built on, small (two
packages with their own small dependencies), and ours to control: the page is one static file that puts every
response on screen as text (`textContent`), never as markup, which matters for enwik8's HTML and wiki markup.
"""

from __future__ import annotations

import hmac
import json
import os
import random
import threading
import time
import uuid
import warnings
import zlib
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from .data import decode_bytes, encode_text
from .sampling import generate
from .utils import option, require, write_jsonl

KINDS = ("compare", "rank", "write")
CHOICES = {"compare": ("A", "B", "tie", "bad", "skip"), "rank": ("rank", "skip"), "write": ("write", "skip")}
TALLY = {"A": "preferred", "B": "preferred", "rank": "ranked", "write": "written"}   # the stats view's columns
LOOPBACK = ("127.0.0.1", "localhost", "::1")
PAGE = Path(__file__).parent / "static" / "label.html"


@dataclass
class LabelConfig:
    rank_size: int = option(4, "responses per ranking item (>= 3)")
    overlap: float = option(0.1, "share of items shown to a second annotator, for inter-annotator agreement")
    ahead: int = option(8, "items per task sampled ahead of the labellers, so the next one is on screen at once")
    batch: int = option(8, "prompts per sampling batch")
    max_new_tokens: int = option(64, "bytes per sampled response")
    temperature: float = option(1.0, "sampling temperature of the responses (PPO's rollouts use 1.0 too)")
    lease_s: float = option(600.0, "seconds an item shown to one annotator is held back from the others")
    seed: int = option(0, "seed of the prompt order, the sampling and the order responses are shown in")

    def __post_init__(self):
        require(self.rank_size >= 3, self, "rank_size", "must be >= 3 (two responses are a comparison)")
        require(0 <= self.overlap <= 1, self, "overlap", "must lie in [0, 1]")
        for name in ("ahead", "batch", "max_new_tokens"):
            require(getattr(self, name) >= 1, self, name, "must be >= 1")
        require(self.temperature > 0, self, "temperature", "must be > 0")


class LabelError(ValueError):
    """A request the store refuses; `status` is the HTTP status the server answers with (nothing was written)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status

# ------------------------------------------------------------------------------------------------ append-only logs


class AppendLog:
    """A JSONL file that is only ever appended to, each line fsynced before `append` returns.

    On open, lines that are not JSON objects (a torn last line: the process killed mid-write) are skipped with a
    warning and left in place; the next append starts on a fresh line."""

    def __init__(self, path: Path):
        self.path, self.rows = Path(path), []
        data = self.path.read_bytes() if self.path.exists() else b""
        for lineno, line in enumerate(data.split(b"\n"), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                assert isinstance(row, dict)
            except (ValueError, AssertionError):
                warnings.warn(f"{self.path}:{lineno}: skipped a line that is not a complete JSON object (a write "
                              f"cut off by a crash?); the rest of the log is used", stacklevel=2)
                continue
            self.rows.append(row)
        self._fresh_line = bool(data) and not data.endswith(b"\n")
        self._file = open(self.path, "ab")

    def append(self, row: dict) -> None:
        line = json.dumps(row, ensure_ascii=False).encode("utf-8") + b"\n"
        self._file.write((b"\n" if self._fresh_line else b"") + line)
        self._file.flush()
        os.fsync(self._file.fileno())
        self._fresh_line = False

    def close(self) -> None:
        self._file.close()

# ------------------------------------------------------------------------------------------------ the store


def check_annotator(name) -> str:
    if not isinstance(name, str) or not 1 <= len(name) <= 40 or not all(c.isalnum() or c in "-_. " for c in name):
        raise LabelError(400, "annotator: give a name of 1-40 letters, digits, spaces or - _ .")
    return name


def is_permutation(order, n: int) -> bool:
    return isinstance(order, list) and sorted(order) == list(range(n)) and all(type(i) is int for i in order)


class LabelStore:
    """Items, labels and who holds what, rebuilt from items.jsonl and events.jsonl on start. Thread-safe."""

    def __init__(self, out, *, overlap: float = 0.0, lease_s: float = 600.0, seed: int = 0):
        self.dir = Path(out)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.overlap, self.lease_s = overlap, lease_s
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)   # notified when items are taken or added
        self.rng = random.Random(seed)                  # the order responses are shown in
        self.items: dict[str, dict] = {}
        self.by_kind: dict[str, list[str]] = {k: [] for k in KINDS}
        self.labels: dict[str, dict[str, dict]] = defaultdict(dict)   # item -> annotator -> label event
        self.history: dict[str, list[dict]] = defaultdict(list)       # annotator -> label events, for undo
        self.leases: dict[str, tuple[str, list[int], float]] = {}     # item -> (annotator, order shown, since)
        self.wanted = {"compare"}                                     # tasks someone asked for: sample ahead
        self.exhausted: set[str] = set()                              # tasks the candidate source has no more of
        self.error: str | None = None                                 # the sampler's last failure, shown on the page
        self._items_log = AppendLog(self.dir / "items.jsonl")
        for row in self._items_log.rows:
            if row.get("kind") in KINDS and isinstance(row.get("id"), str) and isinstance(row.get("responses"), list):
                self._add(row)
            else:
                warnings.warn(f"items.jsonl: skipped a row that is not an item: {str(row)[:80]}", stacklevel=2)
        self._events_log = AppendLog(self.dir / "events.jsonl")
        for event in self._events_log.rows:
            self._apply(event)

    # -- state
    def _add(self, item: dict) -> None:
        self.items[item["id"]] = item
        self.by_kind[item["kind"]].append(item["id"])

    def _apply(self, event: dict) -> None:
        item, annotator = event.get("item"), event.get("annotator")
        if item not in self.items:
            warnings.warn(f"events.jsonl: event {event.get('id')} names item {item!r}, which items.jsonl lacks; "
                          f"skipped", stacklevel=2)
        elif event.get("type") == "label":
            self.labels[item][annotator] = event
            self.history[annotator].append(event)
        elif event.get("type") == "undo":
            undone = [e for e in self.history[annotator] if e["id"] == event.get("undoes")]
            for e in undone:
                self.history[annotator].remove(e)
                self.labels[e["item"]].pop(annotator, None)

    def needed(self, item: str) -> int:
        """Labels an item needs: 2 for a fixed `overlap` share of items (chosen by a hash of the id), else 1."""
        return 2 if zlib.crc32(item.encode()) / 2 ** 32 < self.overlap else 1

    def _judged(self, item: str) -> int:
        return sum(e["choice"] != "skip" for e in self.labels[item].values())

    def _open(self, item: str, annotator: str, now: float) -> bool:
        lease = self.leases.get(item)
        held_by_other = lease is not None and lease[0] != annotator and now - lease[2] < self.lease_s
        return annotator not in self.labels[item] and self._judged(item) < self.needed(item) and not held_by_other

    def fresh(self, kind: str) -> int:
        """Items of a task that nobody has labelled or holds: what the sampler keeps topped up."""
        now = time.time()
        return sum(not self.labels[i] and (i not in self.leases or now - self.leases[i][2] >= self.lease_s)
                   for i in self.by_kind[kind])

    def add_items(self, kind: str, rows: list[dict]) -> list[str]:
        """Record new items (rows of {"prompt", "responses", "source"}) before anyone sees them."""
        with self.lock:
            ids = []
            for row in rows:
                item = {"id": f"{kind}-{len(self.items) + 1}", "kind": kind, **row}
                self._items_log.append(item)
                self._add(item)
                ids.append(item["id"])
            self.changed.notify_all()
            return ids

    # -- what the page asks for
    def view(self, item: str, order: list[int]) -> dict:
        it = self.items[item]
        return {"id": item, "kind": it["kind"], "prompt": it["prompt"], "order": order,
                "responses": [it["responses"][i] for i in order]}

    def next(self, annotator: str, kind: str, holding=()) -> dict:
        """The next item for `annotator`: one they already hold, else a second opinion, else the oldest fresh one."""
        check_annotator(annotator)
        if kind not in KINDS:
            raise LabelError(400, f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
        now = time.time()
        with self.lock:
            self.wanted.add(kind)
            open_ = [i for i in self.by_kind[kind] if i not in holding and self._open(i, annotator, now)]
            if not open_:
                self.changed.notify_all()
                return {"item": None, "done": kind in self.exhausted, "error": self.error}
            mine = lambda i: i in self.leases and self.leases[i][0] == annotator  # noqa: E731
            pick = min(open_, key=lambda i: (not mine(i), not self.labels[i]))      # min keeps creation order
            n = len(self.items[pick]["responses"])
            order = self.leases[pick][1] if mine(pick) else self.rng.sample(range(n), n)
            self.leases[pick] = (annotator, order, now)
            self.changed.notify_all()
            return {"item": self.view(pick, order)}

    def label(self, annotator: str, item: str, choice: str, order: list[int], *, ranking: list[int] | None = None,
              text: str | None = None) -> dict:
        """Record one label. `order`: the item's responses as shown (A = order[0]); `ranking`: positions as shown,
        best first; `text`: a written response. Returns the event written."""
        check_annotator(annotator)
        with self.lock:
            if item not in self.items:
                raise LabelError(404, f"no item {item!r}")
            it = self.items[item]
            if annotator in self.labels[item]:
                raise LabelError(409, f"{annotator} has already labelled {item} (undo it to change the label)")
            if choice not in CHOICES[it["kind"]]:
                raise LabelError(400, f"a {it['kind']} label is one of {', '.join(CHOICES[it['kind']])}, "
                                      f"got {choice!r}")
            n = len(it["responses"])
            if not is_permutation(order, n):
                raise LabelError(400, f"order must list the item's {n} responses as shown, got {order!r}")
            event = {"type": "label", "id": uuid.uuid4().hex, "annotator": annotator, "time": round(time.time(), 3),
                     "item": item, "kind": it["kind"], "order": order, "choice": choice}
            if choice in ("A", "B"):
                event["winner"] = order["AB".index(choice)]
            elif choice == "rank":
                if not is_permutation(ranking, n):
                    raise LabelError(400, f"ranking must order all {n} shown positions, best first, got {ranking!r}")
                event["ranking"] = [order[p] for p in ranking]   # response indices of the item, best first
            elif choice == "write":
                if not isinstance(text, str) or not text.strip() or len(text) > 20_000:
                    raise LabelError(400, "text: write a response of 1 to 20,000 characters")
                event["text"] = text
            self._events_log.append(event)
            self._apply(event)
            self.leases.pop(item, None)
            self.changed.notify_all()
            return event

    def undo(self, annotator: str) -> dict:
        """Undo `annotator`'s last label; the item comes back to them, shown in the same order."""
        check_annotator(annotator)
        with self.lock:
            if not self.history[annotator]:
                raise LabelError(409, f"{annotator} has nothing to undo")
            last = self.history[annotator][-1]
            event = {"type": "undo", "id": uuid.uuid4().hex, "annotator": annotator, "time": round(time.time(), 3),
                     "item": last["item"], "undoes": last["id"]}
            self._events_log.append(event)
            self._apply(event)
            self.leases[last["item"]] = (annotator, last["order"], time.time())
            return {"item": self.view(last["item"], last["order"])}

    def progress(self, annotator: str) -> dict:
        with self.lock:
            return {"mine": len(self.history[annotator]), "all": sum(len(v) for v in self.history.values()),
                    "ready": {k: self.fresh(k) for k in KINDS}}

    # -- what comes out
    def export(self) -> dict:
        """Write preferences.jsonl and demos.jsonl from the labels in force; returns what was written."""
        with self.lock:
            events = sorted((e for per in self.labels.values() for e in per.values()), key=lambda e: e["time"])
        prefs, demos, left_out = [], [], Counter()
        for e in events:
            it = self.items[e["item"]]
            who = {"annotator": e["annotator"], "item": e["item"]}
            if "winner" in e:
                w = e["winner"]
                prefs.append({"prompt": it["prompt"], "chosen": it["responses"][w],
                              "rejected": it["responses"][1 - w], **who})
            elif "ranking" in e:
                prefs.append({"prompt": it["prompt"], "responses": [it["responses"][i] for i in e["ranking"]], **who})
            elif "text" in e:
                demos.append({"prompt": it["prompt"], "response": e["text"], **who})
            else:
                left_out[e["choice"]] += 1
        write_jsonl(prefs, self.dir / "preferences.jsonl")
        write_jsonl(demos, self.dir / "demos.jsonl")
        return {"preferences": str(self.dir / "preferences.jsonl"), "demos": str(self.dir / "demos.jsonl"),
                "pairs": sum("chosen" in p for p in prefs), "rankings": sum("responses" in p for p in prefs),
                "demonstrations": len(demos), "left_out": dict(left_out)}

    def stats(self, score=None) -> dict:
        """Labels per annotator; agreement on items two annotators judged; agreement of decisive comparisons with
        `score(prompt, responses) -> list[float]` (e.g. the current reward model), when given."""
        with self.lock:
            labels = {i: dict(per) for i, per in self.labels.items() if per}
        per_annotator = defaultdict(Counter)
        for per in labels.values():
            for annotator, e in per.items():
                per_annotator[annotator][TALLY.get(e["choice"], e["choice"])] += 1
        outcome = lambda e: e.get("winner", e["choice"])  # noqa: E731  the preferred response, or tie / bad
        twice = [[e for e in per.values() if e["choice"] != "skip"] for i, per in labels.items()
                 if self.items[i]["kind"] == "compare"]
        twice = [judged[:2] for judged in twice if len(judged) >= 2]
        decisive = [(a, b) for a, b in twice if "winner" in a and "winner" in b]
        out = {"annotators": {k: dict(v) for k, v in sorted(per_annotator.items())},
               "items": len(self.items), "labelled": len(labels),
               "agreement": {"items": len(twice), "same": sum(outcome(a) == outcome(b) for a, b in twice),
                             "decisive_items": len(decisive),
                             "decisive_same": sum(a["winner"] == b["winner"] for a, b in decisive)}}
        if score is not None:
            votes = [e for per in labels.values() for e in per.values() if "winner" in e]
            agree = 0
            for e in votes:
                it = self.items[e["item"]]
                s = score(it["prompt"], it["responses"])
                agree += s[e["winner"]] > s[1 - e["winner"]]
            out["reward_model"] = {"pairs": len(votes), "agree": agree}
        return out

    def close(self) -> None:
        self._items_log.close()
        self._events_log.close()

# ------------------------------------------------------------------------------------------------ candidates


class SampledCandidates:
    """Responses sampled from a model (the KV-cached sampler, a batch at a time) for prompts in a seeded order."""

    def __init__(self, model, prompts: list[str], config: LabelConfig):
        if not prompts:
            raise ValueError("no prompts to sample responses for")
        self.model, self.prompts, self.cfg = model.eval(), prompts, config
        self.room = model.config.max_seq_len - config.max_new_tokens
        if self.room < 1:
            raise ValueError(f"max_new_tokens {config.max_new_tokens} leaves no room for a prompt in the model's "
                             f"{model.config.max_seq_len} positions")

    def _prompt(self, index: int) -> int:
        order = list(range(len(self.prompts)))
        random.Random(self.cfg.seed * 7919 + index // len(order)).shuffle(order)  # a new order each pass
        return order[index % len(order)]

    def make(self, kind: str, start: int, n: int, k: int) -> list[dict]:
        picks = [self._prompt(start + j) for j in range(n)]
        tokens = [encode_text(self.prompts[p])[-self.room:] for p in picks]
        device = next(self.model.parameters()).device
        seed = self.cfg.seed * 1_000_003 + KINDS.index(kind) * 10_007 + start
        gen = generate(self.model, [t.to(device) for t in tokens for _ in range(k)], self.cfg.max_new_tokens,
                       temperature=self.cfg.temperature, generator=torch.Generator(device).manual_seed(seed))
        texts = [decode_bytes(t[m].tolist()) for t, m in zip(gen.tokens.cpu(), gen.mask.cpu())]
        return [{"prompt": self.prompts[p], "responses": texts[j * k:(j + 1) * k], "source": p}
                for j, p in enumerate(picks)]


class FileCandidates:
    """Responses written elsewhere, no model needed: JSONL rows {"prompt": str, "responses": [str, ...]}. Compare
    takes two of a row's responses (at random when it has more), Rank up to `rank_size` (rows with >= 3), Write
    shows the first as the model's attempt. Each row is used once per task."""

    def __init__(self, path, config: LabelConfig):
        from .feedback import _read_jsonl, _text
        self.rows, self.cfg = [], config
        for n, r in _read_jsonl(path):
            where = f"{path}:{n}"
            responses = r.get("responses")
            if not isinstance(responses, list) or not responses:
                raise ValueError(f"{where}: 'responses' must be a list of strings (the candidates to label)")
            self.rows.append({"prompt": _text(r, "prompt", where),
                              "responses": [_text({"r": x}, "r", f"{where} responses[{i}]")
                                            for i, x in enumerate(responses)]})

    def make(self, kind: str, start: int, n: int, k: int) -> list[dict]:
        least = {"compare": 2, "rank": 3, "write": 1}[kind]
        usable = [i for i, r in enumerate(self.rows) if len(r["responses"]) >= least]
        out = []
        for i in usable[start:start + n]:
            responses = self.rows[i]["responses"]
            if kind != "write" and len(responses) > k:
                responses = random.Random(self.cfg.seed * 7919 + i).sample(responses, k)
            out.append({"prompt": self.rows[i]["prompt"], "responses": responses[:1] if kind == "write" else responses,
                        "source": i})
        return out


def sample_ahead(store: LabelStore, source, config: LabelConfig, stop: threading.Event) -> None:
    """Keep `ahead` fresh items of every task someone asked for; runs in a thread beside the server."""
    k = {"compare": 2, "rank": config.rank_size, "write": 1}
    while not stop.is_set():
        with store.lock:
            todo = [kind for kind in KINDS if kind in store.wanted and kind not in store.exhausted
                    and store.fresh(kind) < config.ahead]
            if not todo:
                store.changed.wait(timeout=0.5)
                continue
        kind = todo[0]
        try:
            rows = source.make(kind, len(store.by_kind[kind]), config.batch, k[kind])
        except Exception as err:  # shown on the page and printed; the server keeps serving what it has
            store.error = f"sampling failed: {type(err).__name__}: {err}"
            print(store.error)
            stop.wait(5.0)
            continue
        store.error = None
        if rows:
            store.add_items(kind, rows)
        else:
            store.exhausted.add(kind)

# ------------------------------------------------------------------------------------------------ the web app


def reward_scorer(reward_model, max_len: int = 512):
    """score(prompt, responses) -> list of the reward model's scores, for the stats view."""
    from .feedback import collate, encode
    lock, cache = threading.Lock(), {}

    @torch.no_grad()
    def score(prompt: str, responses: list[str]) -> list[float]:
        key = (prompt, tuple(responses))
        with lock:
            if key not in cache:
                batch = collate([encode(prompt, r, max_len) for r in responses])
                cache[key] = reward_model.eval().score(**batch).tolist()
            return cache[key]
    return score


def make_app(store: LabelStore, *, token: str | None = None, score=None):
    """The Starlette app: the page and a small JSON API (next, label, undo, stats, export)."""
    try:
        from starlette.applications import Starlette
        from starlette.concurrency import run_in_threadpool
        from starlette.responses import HTMLResponse, JSONResponse
        from starlette.routing import Route
    except ImportError:
        raise ImportError('the labelling app needs starlette and uvicorn: pip install -e ".[label]"') from None

    def api(handler):
        async def endpoint(request):
            if token is not None and not hmac.compare_digest(request.headers.get("x-label-token", ""), token):
                return JSONResponse({"error": "this server needs its token: open the URL it printed"}, 403)
            if token is None and request.headers.get("host", "").rsplit(":", 1)[0] not in LOOPBACK + ("[::1]",):
                return JSONResponse({"error": "without --token the API answers loopback names only"}, 403)
            if request.method == "POST" and request.headers.get("content-type", "").split(";")[0] != "application/json":
                # another site's page can send a plain-text POST to 127.0.0.1 without asking (CSRF); a JSON one
                # needs the browser's preflight, which this server never grants
                return JSONResponse({"error": "send JSON (Content-Type: application/json)"}, 415)
            raw = await request.body()
            try:
                body = json.loads(raw) if raw else {}
                if not isinstance(body, dict):
                    raise ValueError
            except ValueError:
                return JSONResponse({"error": "the request body must be a JSON object"}, 400)
            try:  # in a thread: the store may wait on its lock while the sampler adds items
                return JSONResponse(await run_in_threadpool(handler, body))
            except LabelError as err:
                return JSONResponse({"error": str(err)}, err.status)
            except (KeyError, TypeError) as err:
                return JSONResponse({"error": f"bad request: missing or mistyped field {err}"}, 400)
        return endpoint

    def label(body):
        event = store.label(body["annotator"], body["item"], body["choice"], body["order"],
                            ranking=body.get("ranking"), text=body.get("text"))
        return {"ok": True, "event": event["id"], "progress": store.progress(body["annotator"])}

    routes = [
        Route("/", lambda request: HTMLResponse(PAGE.read_text(encoding="utf-8"))),
        Route("/api/next", api(lambda b: store.next(b["annotator"], b["kind"], set(b.get("holding", ())))),
              methods=["POST"]),
        Route("/api/label", api(label), methods=["POST"]),
        Route("/api/undo", api(lambda b: store.undo(b["annotator"])), methods=["POST"]),
        Route("/api/progress", api(lambda b: store.progress(b["annotator"])), methods=["POST"]),
        Route("/api/stats", api(lambda b: store.stats(score)), methods=["GET"]),
        Route("/api/export", api(lambda b: store.export()), methods=["POST"]),
    ]
    return Starlette(routes=routes)


def serve(store: LabelStore, source, config: LabelConfig, *, host: str = "127.0.0.1", port: int = 8765,
          token: str | None = None, score=None) -> dict:
    """Serve until Ctrl-C, sampling ahead in a thread; then export and return the export's summary."""
    if host not in LOOPBACK and not token:
        raise ValueError(f"--host {host} exposes the page to the network: also give --token SECRET (every labeller "
                         f"then opens the URL with ?token=SECRET)")
    try:
        import uvicorn
    except ImportError:
        raise ImportError('the labelling app needs starlette and uvicorn: pip install -e ".[label]"') from None
    stop = threading.Event()
    sampler = threading.Thread(target=sample_ahead, args=(store, source, config, stop), daemon=True)
    sampler.start()
    url = f"http://{'127.0.0.1' if host in LOOPBACK else host}:{port}/" + (f"?token={token}" if token else "")
    print(f"labelling: {len(store.items)} items, {sum(map(len, store.history.values()))} labels so far in "
          f"{store.dir}\nopen {url} (Ctrl-C to stop; the export is written then)", flush=True)
    try:
        uvicorn.Server(uvicorn.Config(make_app(store, token=token, score=score), host=host, port=port,
                                      log_level="warning")).run()
    finally:
        stop.set()
        with store.lock:
            store.changed.notify_all()
        summary = store.export()
        print(f"exported {summary['pairs']} pairs, {summary['rankings']} rankings -> {summary['preferences']}; "
              f"{summary['demonstrations']} demonstrations -> {summary['demos']}; left out: {summary['left_out']}")
    return summary
