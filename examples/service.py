#!/usr/bin/env python
"""An HTTP service for a trained recmeta model, on the standard library only.

::

    python examples/service.py --model model.recmeta --port 8080 [--workers N]
                               [--feedback-log feedback.jsonl] [--host 127.0.0.1]

Endpoints (JSON in, JSON out; see ``examples/README.md`` for every field):

* ``POST /recommend``: ``{"user": id}`` (a training user, or any user that sent feedback) or
  ``{"history": [item ids]}`` (a new user, adapted on the fly) plus the options of
  :meth:`recmeta_sdk.Recommender.recommend` (``k``, ``exclude_seen``, ``exclude``,
  ``candidates``, ``explore``, ``seed``, ``epsilon``, ``temperature``, ``diversity``,
  ``popularity_penalty``, ``explain``) and of :meth:`~recmeta_sdk.Recommender.adapt`
  (``features``, ``steps``, ``unknown``). Returns ``items``, ``scores``, ``propensities``
  (with ``explore``), ``model_version`` and ``state_version`` (feedback events applied to the
  user's online state).
* ``POST /feedback``: one event ``{"user", "item", "reward", "propensity", "timestamp",
  "position"}`` or ``{"events": [...]}``; the next ``/recommend`` of that user, on any
  worker, is served from the updated online state.
* ``GET /health``: status, model path, version and digest, uptime, reload state.
* ``POST /reload``: ``{"path": optional, "replay": "auto" | "all" | "since_reload"}``: loads
  a model file in the background and swaps it in atomically (202 at once).

Bad input (malformed JSON, wrong types, unknown users or items, a bad ``k``) is answered 400
with ``{"error": message, "field": the field}``; 500 is only for a server fault, whose
traceback is logged.

How it works
------------
**One model per process.** Each worker process loads the model file itself with
:func:`recmeta_sdk.load`. The file is *not* memory-mapped: ``recmeta_sdk.model.io`` reads it into
memory, checks its SHA-256 and copies each tensor out, so every worker holds its own copy of
the weights (N workers: about N x the model's size in RAM, and twice that in a worker during
a reload, while the old and the new model both live). Only the file on disk is shared.

**Online state is per process**, but every worker reaches the same one: the service keeps an
append-only *service log* (JSON lines; ``--feedback-log PATH``, or an unnamed temporary file
created before the workers fork and inherited by them). ``POST /feedback`` validates the
events against the model, appends them to the log as one line (under an ``fcntl`` lock, so
lines never interleave) and then brings its own model up to the end of the log. Every
worker, before it serves any request (and every ``--poll`` seconds when idle), applies the
lines it has not applied yet, in log order, with :meth:`Recommender.feedback`. So all
workers apply the same events in the same order (the same online states), and feedback
acknowledged by worker A is seen by the next request to worker B (read-your-writes across
workers). The worker that received the events answers 400 if they were rejected when
applied (e.g. a state that would become non-finite); every worker rejects them alike.

**Reload** is a line in the same log, so a ``POST /reload`` that reaches one worker reaches
all: each loads the file in a background thread while it keeps serving the old model, replays
the log's feedback into the new model (``replay``: ``"all"`` events, only those after the
reload request with ``"since_reload"``, or ``"auto"``, the default: ``since_reload`` when the
new file carries its own feedback log, i.e. was saved after ``train(None, resume=model)``,
else ``all``), catches up with the events that arrived meanwhile and swaps the reference
under the lock the live feedback takes. A request reads the reference once: requests in flight
finish on the old model; no request waits for a load. A failed load (missing or corrupt file)
is logged and shown by ``/health``; the old model keeps serving. At start a worker loads
``--model`` and replays every feedback event already in a named log; reload lines of an earlier
run are not followed (truncate or rotate the log when you deploy a model trained on it), those
of this run are (a restarted worker catches up with the model the others serve, in the
background).

**Workers** (``--workers N > 1``): the parent binds the listening socket and forks N workers
that accept on it (a pre-forked shared socket; the kernel hands each connection to one of
them). The parent imports the SDK before it forks (the workers share the imported libraries
copy-on-write) but loads no model and runs no torch op; it restarts a worker that dies (the
new one replays the log) and forwards SIGTERM / SIGINT; a worker whose parent is gone (killed) stops by itself. With ``--workers 1`` the service runs in one
process. Each worker uses ``--threads`` torch threads (default: cores / workers).

**Shutdown** on SIGTERM or SIGINT: a worker stops accepting, lets the requests in flight
finish, closes idle keep-alive connections and exits 0; the parent waits for its workers.

Expose only ``/recommend``, ``/feedback`` and ``/health`` to untrusted clients: ``/reload``
loads a file named by the caller (never unpickled; a bad file gives an error, but keep it to
operators). The default host is 127.0.0.1.
"""
from __future__ import annotations

import argparse
import fcntl
import http.server
import itertools
import json
import logging
import math
import os
import queue
import select
import signal
import socket
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

# the SDK is imported where it is used: the argument parsing and the supervisor's start need
# no torch
logger = logging.getLogger("recmeta.service")

MAX_BODY_BYTES = 1 << 20
MAX_LIST = 100_000          # items in a history / exclude / candidates list
MAX_EVENTS = 10_000         # feedback events in one request
MAX_ID_CHARS = 1024
REPLAY_MODES = ("auto", "all", "since_reload")
# bounds that keep the scores finite in float32 (the SDK checks > 0 and finite only: a penalty of
# 1e300 overflows the bias, which the kernel then refuses without naming the option)
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-3, 1e3
MAX_POPULARITY_PENALTY = 1e3
_MISSING = object()

RECOMMEND_FIELDS = ("user", "history", "features", "steps", "unknown", "k", "exclude_seen", "exclude",
                    "candidates", "explore", "seed", "epsilon", "temperature", "diversity",
                    "popularity_penalty", "explain")
EVENT_FIELDS = ("user", "item", "reward", "propensity", "timestamp", "position")


# ============================================================================ validation

class BadRequest(Exception):
    """Bad client input: answered 400 (or ``status``) with the message and the field."""

    def __init__(self, field: str | None, message: str, status: int = 400):
        super().__init__(message)
        self.field = field
        self.message = message
        self.status = status


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _short(v) -> str:
    s = json.dumps(v) if not isinstance(v, str) else repr(v)
    return s if len(s) <= 80 else s[:77] + "..."


def _id(v, field: str):
    """A user or item id: an int or a string (JSON)."""
    if _is_int(v):
        return v
    if isinstance(v, str):
        if len(v) > MAX_ID_CHARS:
            raise BadRequest(field, f"{field}: an id of {len(v)} characters (at most {MAX_ID_CHARS})")
        return v
    raise BadRequest(field, f"{field} must be an int or a string id, got {_short(v)}")


def _id_list(v, field: str) -> list:
    if not isinstance(v, list):
        raise BadRequest(field, f"{field} must be a list of item ids, got {_short(v)}")
    if len(v) > MAX_LIST:
        raise BadRequest(field, f"{field} has {len(v)} entries (at most {MAX_LIST})")
    return [_id(x, f"{field}[{i}]") for i, x in enumerate(v)]


def _number_list(v, field: str, n: int) -> list:
    if not isinstance(v, list) or len(v) != n:
        raise BadRequest(field, f"{field} must be a list of {n} numbers (one per history item), got {_short(v)}")
    for i, x in enumerate(v):
        if not _is_number(x):
            raise BadRequest(f"{field}[{i}]", f"{field}[{i}] must be a finite number, got {_short(x)}")
    return v


def _history(v):
    """``history``: a list of item ids, or ``{"item": [...], "reward": [...], "timestamp": [...]}``."""
    if isinstance(v, list):
        return _id_list(v, "history")
    if isinstance(v, dict):
        bad = sorted(set(v) - {"item", "reward", "timestamp"})
        if bad:
            raise BadRequest(f"history.{bad[0]}", f"history has unknown key(s) {bad}; known: item, reward, timestamp")
        if "item" not in v:
            raise BadRequest("history.item", "history as an object needs an 'item' list")
        items = _id_list(v["item"], "history.item")
        out: dict[str, Any] = {"item": items}
        for key in ("reward", "timestamp"):
            if v.get(key) is not None:
                out[key] = _number_list(v[key], f"history.{key}", len(items))
        return out
    raise BadRequest("history", f"history must be a list of item ids or an object with 'item', got {_short(v)}")


def parse_recommend(body: dict, max_k: int) -> tuple[dict, dict]:
    """Split a ``/recommend`` body into (who: user / history / adapt options, recommend kwargs)."""
    bad = sorted(set(body) - set(RECOMMEND_FIELDS))
    if bad:
        raise BadRequest(bad[0], f"unknown field(s) {bad}; known: {list(RECOMMEND_FIELDS)}")
    has_user, has_hist = body.get("user") is not None, body.get("history") is not None
    if has_user == has_hist:
        raise BadRequest("user", "give exactly one of 'user' (a known user or one with feedback) and "
                                 "'history' (a new user's item ids)")
    who: dict[str, Any] = {}
    if has_user:
        who["user"] = _id(body["user"], "user")
        for f in ("features", "steps", "unknown"):
            if body.get(f) is not None:
                raise BadRequest(f, f"{f} applies to a new user's 'history', not to 'user'")
    else:
        who["history"] = _history(body["history"])
        feats = body.get("features")
        if feats is not None and not isinstance(feats, dict):
            raise BadRequest("features", f"features must be an object of user side features, got {_short(feats)}")
        who["features"] = feats
        steps = body.get("steps")
        if steps is not None and (not _is_int(steps) or steps < 0):
            raise BadRequest("steps", f"steps must be an int >= 0, got {_short(steps)}")
        who["steps"] = steps
        unknown = body.get("unknown", "error")
        if unknown not in ("error", "drop"):
            raise BadRequest("unknown", f"unknown must be 'error' or 'drop', got {_short(unknown)}")
        who["unknown"] = unknown
    kw: dict[str, Any] = {}
    k = body.get("k", 10)
    if not _is_int(k) or not 1 <= k <= max_k:
        raise BadRequest("k", f"k must be an int in [1, {max_k}], got {_short(k)}")
    for f in ("exclude_seen", "explain"):
        if f in body:
            if not isinstance(body[f], bool):
                raise BadRequest(f, f"{f} must be true or false, got {_short(body[f])}")
            kw[f] = body[f]
    for f in ("exclude", "candidates"):
        if body.get(f) is not None:
            kw[f] = _id_list(body[f], f)
    explore = body.get("explore")
    if explore not in (None, "sample", "epsilon"):
        raise BadRequest("explore", f"explore must be null, 'sample' or 'epsilon', got {_short(explore)}")
    if explore is not None:
        seed = body.get("seed")
        if not _is_int(seed) or not 0 <= seed < 2 ** 64:
            raise BadRequest("seed", f"explore={explore!r} needs an int seed in [0, 2**64), got {_short(seed)}")
        kw["explore"], kw["seed"] = explore, seed
    elif body.get("seed") is not None:
        raise BadRequest("seed", "seed applies to explore='sample' or 'epsilon' only")
    if body.get("epsilon") is not None:
        e = body["epsilon"]
        if not _is_number(e) or not 0 <= e <= 1:
            raise BadRequest("epsilon", f"epsilon must be a number in [0, 1], got {_short(e)}")
        kw["epsilon"] = float(e)
    if body.get("temperature") is not None:
        t = body["temperature"]
        if not _is_number(t) or not MIN_TEMPERATURE <= t <= MAX_TEMPERATURE:
            raise BadRequest("temperature", f"temperature must be a number in [{MIN_TEMPERATURE:g}, "
                                            f"{MAX_TEMPERATURE:g}], got {_short(t)}")
        kw["temperature"] = float(t)
    if body.get("diversity") is not None:
        d = body["diversity"]
        if not _is_number(d) or not 0 <= d < 1:
            raise BadRequest("diversity", f"diversity must be a number in [0, 1), got {_short(d)}")
        kw["diversity"] = float(d)
    if body.get("popularity_penalty") is not None:
        p = body["popularity_penalty"]
        if not _is_number(p) or not 0 <= p <= MAX_POPULARITY_PENALTY:
            raise BadRequest("popularity_penalty", f"popularity_penalty must be a number in "
                                                   f"[0, {MAX_POPULARITY_PENALTY:g}], got {_short(p)}")
        kw["popularity_penalty"] = float(p)
    return who, dict(kw, k=k)


def parse_feedback(body: dict) -> list:
    """The events of a ``/feedback`` body (one event object, or ``{"events": [...]}``), typed."""
    if "events" in body:
        if set(body) != {"events"}:
            raise BadRequest(min(set(body) - {"events"}), "give either one event or {'events': [...]}, not both")
        events = body["events"]
        if not isinstance(events, list) or not events:
            raise BadRequest("events", f"events must be a non-empty list of event objects, got {_short(events)}")
        if len(events) > MAX_EVENTS:
            raise BadRequest("events", f"events has {len(events)} entries (at most {MAX_EVENTS} per request)")
        prefix = "events[{}]."
    else:
        events = [body]
        prefix = ""
    out = []
    for i, ev in enumerate(events):
        p = prefix.format(i)
        if not isinstance(ev, dict):
            raise BadRequest(p.rstrip(".") or "body", f"{p.rstrip('.')} must be an event object, got {_short(ev)}")
        bad = sorted(set(ev) - set(EVENT_FIELDS))
        if bad:
            raise BadRequest(p + bad[0], f"unknown event field(s) {bad}; known: {list(EVENT_FIELDS)}")
        for f in ("user", "item", "reward"):
            if ev.get(f) is None:
                raise BadRequest(p + f, f"the event needs a {f!r}")
        e = {"user": _id(ev["user"], p + "user"), "item": _id(ev["item"], p + "item")}
        if not _is_number(ev["reward"]):
            raise BadRequest(p + "reward", f"{p}reward must be a finite number, got {_short(ev['reward'])}")
        e["reward"] = float(ev["reward"])
        if ev.get("propensity") is not None:
            q = ev["propensity"]
            if not _is_number(q) or not 0 < q <= 1:
                raise BadRequest(p + "propensity", f"{p}propensity must be a number in (0, 1], got {_short(q)}")
            e["propensity"] = float(q)
        if ev.get("timestamp") is not None:
            if not _is_number(ev["timestamp"]):
                raise BadRequest(p + "timestamp", f"{p}timestamp must be a finite number, got {_short(ev['timestamp'])}")
            e["timestamp"] = float(ev["timestamp"])
        if ev.get("position") is not None:
            pos = ev["position"]
            if not _is_int(pos) or pos < 0:
                raise BadRequest(p + "position", f"{p}position must be an int >= 0, got {_short(pos)}")
            e["position"] = pos
        out.append(e)
    return out


def _sdk_field(message: str, default: str) -> str:
    """The request field an SDK error message starts with (``"exclude has item ids ..."``)."""
    head = message.split(" ", 1)[0].rstrip(":,")
    return head if head in RECOMMEND_FIELDS else default


# ============================================================================ the service log

class ServiceLog:
    """The append-only JSON-lines log the workers share (feedback and reload records).

    Appends take a thread lock and an ``fcntl.lockf`` lock (POSIX record locks exclude other
    processes, also forked ones sharing the open file) and write the whole line at the end
    of the file; readers read complete lines at absolute offsets (``os.pread``), so the
    workers never share a file position.
    """

    def __init__(self, fd: int, path: str | None):
        self.fd = fd
        self.path = path
        self._lock = threading.Lock()

    @classmethod
    def open(cls, path: str | None) -> ServiceLog:
        if path is None:  # unnamed: removed by the OS when the last worker closes it
            with tempfile.TemporaryFile(prefix="recmeta-service-") as f:
                return cls(os.dup(f.fileno()), None)
        return cls(os.open(path, os.O_RDWR | os.O_CREAT, 0o644), os.path.abspath(path))

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def close(self) -> None:
        os.close(self.fd)

    def append(self, record: dict) -> tuple[int, int]:
        """Append one record; returns its (start, end) byte offsets."""
        line = (json.dumps(record, separators=(",", ":"), allow_nan=False) + "\n").encode()
        with self._lock:
            fcntl.lockf(self.fd, fcntl.LOCK_EX)
            try:
                start = os.fstat(self.fd).st_size
                done = 0
                while done < len(line):
                    done += os.pwrite(self.fd, line[done:], start + done)
            finally:
                fcntl.lockf(self.fd, fcntl.LOCK_UN)
        return start, start + len(line)

    def records(self, pos: int, end: int, chunk: int = 1 << 20) -> Iterator[tuple[dict, int]]:
        """The complete records in [pos, end), each with the offset after it (read in chunks
        of ``chunk`` bytes; a line still being written at ``end`` is left for the next read)."""
        buf = b""
        at = pos  # the file offset of buf[0]
        while pos < end:
            b = os.pread(self.fd, min(chunk, end - pos), pos)
            if not b:
                break
            pos += len(b)
            buf += b
            start = 0
            while True:
                nl = buf.find(b"\n", start)
                if nl < 0:
                    break
                line = buf[start:nl]
                start = nl + 1
                if line.strip():
                    try:
                        rec = json.loads(line)
                    except ValueError:
                        logger.error("service log: unreadable line at byte %d passed over", at + start - len(line) - 1)
                        continue
                    yield rec, at + start
            buf = buf[start:]
            at += start


# ============================================================================ the model

def model_digest(path: str) -> str:
    """The SHA-256 a recmeta model file carries in its metadata (the SDK checks it at load but
    does not expose it: read from the safetensors header here). ValueError if it has none."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            (hlen,) = struct.unpack("<Q", head)
            if hlen > 100_000_000:
                raise ValueError("header too long")
            header = json.loads(f.read(hlen))
        return str(json.loads(header["__metadata__"]["recmeta"])["sha256"])
    except (struct.error, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: no model digest ({e})") from None


@dataclass
class Served:
    """One loaded model and what ``/health`` says of it (replaced whole on reload)."""

    model: Any
    path: str
    digest: str
    loaded_at: float
    generation: int = 0
    events: int = 0  # feedback events applied to this model

    @property
    def version(self) -> str:
        return self.digest[:16]


def load_served(path: str) -> Served:
    import recmeta_sdk as rm

    for _ in range(3):  # the digest of the file that was loaded (not of one renamed over it since)
        try:
            before = model_digest(path)
        except (OSError, ValueError):
            before = None  # not a model file: rm.load says why
        model = rm.load(path)
        if model_digest(path) == before:
            return Served(model, os.path.abspath(path), before, time.time())
    raise RuntimeError(f"{path} keeps changing while it is loaded")


def _json_default(o):
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


# ============================================================================ one worker

class Worker:
    """The state of one worker process: the served model, its position in the service log,
    the background loader (see the module docstring)."""

    def __init__(self, model_path: str, log: ServiceLog, *, workers: int = 1, max_k: int = 1000,
                 poll_s: float = 0.1, run_start: int = 0, parent_pid: int | None = None):
        self.model_path = os.path.abspath(model_path)
        self.log = log
        self.run_start = run_start  # the log's size when the service started
        self.parent_pid = parent_pid  # the supervisor's (several workers): stop when it is gone
        self.on_orphan: Callable[[], None] | None = None
        self.workers = workers
        self.max_k = max_k
        self.poll_s = poll_s
        self.started = time.time()
        self.served: Served | None = None
        self.applied = 0                     # log offset the served model has applied
        self._apply_lock = threading.Lock()  # live application of the log and the swap
        self._seq = itertools.count()
        self._mine: set = set()              # origins of this worker's pending feedback records
        self._outcomes: dict[str, tuple[str, str] | None] = {}
        self._reloads: queue.Queue = queue.Queue()
        self.reload_state: dict = {"state": "idle"}
        self._stop = threading.Event()
        self._threads: list = []

    # ---------------------------------------------------------------- start / stop
    def start(self) -> None:
        """Load the model, replay the feedback already in the log, start the helper threads.

        A worker that starts after others (a restarted one) also follows the reloads of this
        run (the log's reload records after ``run_start``), in the background like any reload:
        it serves ``--model`` until it has loaded the model the others serve."""
        served = load_served(self.model_path)
        end = self.log.size()
        pos = self._replay(served, 0, end)
        self.served, self.applied = served, pos
        for rec, nxt in self.log.records(self.run_start, pos):
            if rec.get("t") == "reload":
                self._reloads.put((rec, nxt))
        logger.info("worker %d: model %s (version %s) loaded; %d feedback events replayed; %d reloads to follow",
                    os.getpid(), served.path, served.version, served.events, self._reloads.qsize())
        for name, fn in (("loader", self._loader), ("poller", self._poller)):
            t = threading.Thread(target=fn, name=f"recmeta-{name}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        self._stop.set()
        self._reloads.put(None)
        for t in self._threads:
            t.join(timeout=30)

    def _poller(self) -> None:
        while not self._stop.wait(self.poll_s):
            if self.parent_pid is not None and os.getppid() != self.parent_pid:
                # the supervisor was killed (SIGKILL: it could not stop us): do not run on as an orphan
                logger.error("worker %d: the parent process %d is gone: stopping", os.getpid(), self.parent_pid)
                self.parent_pid = None
                if self.on_orphan is not None:
                    self.on_orphan()
            try:
                self.catch_up()
            except Exception:  # keep polling; the fault is logged
                logger.exception("worker %d: applying the service log failed", os.getpid())

    # ---------------------------------------------------------------- the log
    def _apply_feedback(self, served: Served, rec: dict) -> tuple[str, str] | None:
        """Apply one feedback record; None, or ("rejected", why) when the SDK refuses the
        events (alike on every worker: the same model, state and order), or ("fault", what)
        for a server fault (logged with its traceback). Either way the record is passed over,
        so that one record cannot stop the log."""
        try:
            served.model.feedback(rec["events"])
        except (ValueError, TypeError) as e:
            return "rejected", str(e)
        except Exception as e:  # a fault: logged, the origin answers 500
            logger.exception("worker %d: applying feedback record %s failed", os.getpid(), rec.get("origin"))
            return "fault", repr(e)
        served.events += len(rec["events"])
        return None

    def _replay(self, served: Served, pos: int, end: int) -> int:
        """Apply the feedback records in [pos, end) to a model not yet served; the new position."""
        for rec, nxt in self.log.records(pos, end):
            if rec.get("t") == "feedback":
                err = self._apply_feedback(served, rec)
                if err:
                    logger.warning("worker %d: replayed feedback %s: %s", os.getpid(), *err)
            pos = nxt
        return pos

    def catch_up(self) -> None:
        """Apply the log's new records to the served model (before every request)."""
        if self.log.size() <= self.applied:  # the usual case: one fstat, no lock
            return
        with self._apply_lock:
            end = self.log.size()
            for rec, nxt in self.log.records(self.applied, end):
                kind = rec.get("t")
                if kind == "feedback":
                    err = self._apply_feedback(self.served, rec)
                    origin = rec.get("origin")
                    if origin in self._mine:
                        self._outcomes[origin] = err
                    elif err:
                        logger.warning("worker %d: feedback from %s %s: %s", os.getpid(), origin, *err)
                self.applied = nxt
                if kind == "reload":
                    self._reloads.put((rec, nxt))

    # ---------------------------------------------------------------- reload
    def _loader(self) -> None:
        while True:
            item = self._reloads.get()
            if item is None:
                return
            rec, at = item
            path = rec["path"]
            self.reload_state = {"state": "loading", "path": path, "since": time.time()}
            t0 = time.perf_counter()
            try:
                served = load_served(path)
                replay = rec.get("replay", "auto")
                if replay == "auto":
                    from recmeta_sdk import online

                    replay = "since_reload" if len(online.feedback_log(served.model)) else "all"
                pos = 0 if replay == "all" else at
                # replay outside the lock while live traffic goes on (a few rounds: each catches
                # up with what arrived during the previous one), then the rest under it
                for _ in range(5):
                    if self.applied <= pos or self._stop.is_set():
                        break
                    pos = self._replay(served, pos, self.applied)
                with self._apply_lock:
                    pos = self._replay(served, pos, self.applied)
                    served.generation = self.served.generation + 1
                    old, self.served = self.served, served
            except (OSError, ValueError, RuntimeError) as e:  # a missing or bad file: keep serving
                logger.error("worker %d: reload of %s failed: %s", os.getpid(), path, e)
                self.reload_state = {"state": "failed", "path": path, "error": str(e), "at": time.time()}
                continue
            except Exception as e:  # a fault: logged with its traceback
                logger.exception("worker %d: reload of %s failed", os.getpid(), path)
                self.reload_state = {"state": "failed", "path": path, "error": repr(e), "at": time.time()}
                continue
            s = time.perf_counter() - t0
            logger.info("worker %d: reloaded %s: version %s -> %s in %.3f s (replay %s, %d events)",
                        os.getpid(), path, old.version, served.version, s, replay, served.events)
            self.reload_state = {"state": "done", "path": path, "seconds": round(s, 4), "at": time.time(),
                                 "replay": replay}

    # ---------------------------------------------------------------- endpoints
    def health(self, _body) -> dict:
        s = self.served
        return {"status": "ok", "model_path": s.path, "model_version": s.version, "model_digest": s.digest,
                "generation": s.generation, "model_loaded_at": s.loaded_at,
                "uptime_s": round(time.time() - self.started, 3), "worker_pid": os.getpid(),
                "workers": self.workers, "reload": self.reload_state,
                "service_log": {"path": self.log.path, "applied_bytes": self.applied,
                                "feedback_events_applied": s.events},
                "items": int(s.model.n_items), "users": len(s.model.user_ids)}

    def recommend(self, body: dict) -> dict:
        who, kw = parse_recommend(body, self.max_k)
        self.catch_up()
        served = self.served  # read once: this request finishes on this model
        model = served.model
        from recmeta_sdk import online

        dropped: list = []
        if "user" in who:
            user = who["user"]
            if online.current(model, user) is not None:
                try:
                    recs, version = online.recommend(model, user, **kw)
                except (ValueError, TypeError) as e:
                    raise BadRequest(_sdk_field(str(e), "request"), str(e)) from None
            else:
                try:
                    state = model.user_state(user)
                except (ValueError, TypeError) as e:
                    raise BadRequest("user", str(e)) from None
                recs, version = self._recommend(model, state, kw), 0
        else:
            try:
                state = model.adapt(who["history"], steps=who["steps"], features=who["features"],
                                    unknown=who["unknown"])
            except (ValueError, TypeError) as e:
                field = "features" if "feature" in str(e) else "steps" if str(e).startswith("steps") else "history"
                raise BadRequest(field, str(e)) from None
            dropped = list(state.dropped)
            recs, version = self._recommend(model, state, kw), 0
        valid = recs.valid
        out = {"items": recs.ids[valid].tolist(), "scores": [float(x) for x in recs.scores[valid]],
               "propensities": None if recs.propensities is None else
               [float(x) for x in recs.propensities[valid]],
               "model_version": served.version, "state_version": int(version)}
        if "user" in who:
            out["user"] = who["user"]
        if dropped:
            out["dropped"] = dropped
        if recs.explanations is not None:
            out["explanations"] = recs.explanations
        return out

    @staticmethod
    def _recommend(model, state, kw):
        try:
            return model.recommend(state, **kw)
        except (ValueError, TypeError) as e:
            raise BadRequest(_sdk_field(str(e), "request"), str(e)) from None

    def feedback(self, body: dict) -> dict:
        events = parse_feedback(body)
        self.catch_up()
        served = self.served
        from recmeta_sdk import online

        try:
            online.check_events(served.model, events)  # item ids, ranges: before it is logged
        except (ValueError, TypeError) as e:
            raise BadRequest(_feedback_field(str(e)), str(e)) from None
        origin = f"{os.getpid()}:{next(self._seq)}"
        self._mine.add(origin)
        try:
            self.log.append({"t": "feedback", "origin": origin, "events": events})
            self.catch_up()  # applies this record (and all before it) in log order
            err = self._outcomes.pop(origin, _MISSING)
        finally:
            self._mine.discard(origin)
        if err is _MISSING:
            raise RuntimeError(f"feedback record {origin} was appended but not applied")
        if err is not None and err[0] == "fault":
            raise RuntimeError(f"applying feedback record {origin} failed: {err[1]}")
        if err is not None:
            raise BadRequest("events", err[1])
        served = self.served
        users = []
        for u in dict.fromkeys(e["user"] for e in events):
            cur = online.current(served.model, u)
            users.append({"user": u, "state_version": None if cur is None else int(cur.version)})
        return {"accepted": len(events), "users": users, "model_version": served.version}

    def reload(self, body: dict) -> tuple[int, dict]:
        bad = sorted(set(body) - {"path", "replay"})
        if bad:
            raise BadRequest(bad[0], f"unknown field(s) {bad}; known: ['path', 'replay']")
        path = body.get("path", self.served.path)
        if not isinstance(path, str) or not path:
            raise BadRequest("path", f"path must be a file path string, got {_short(path)}")
        if not os.path.isfile(path):
            raise BadRequest("path", f"no model file at {path!r}")
        replay = body.get("replay", "auto")
        if replay not in REPLAY_MODES:
            raise BadRequest("replay", f"replay must be one of {list(REPLAY_MODES)}, got {_short(replay)}")
        path = os.path.abspath(path)
        self.log.append({"t": "reload", "origin": f"{os.getpid()}:{next(self._seq)}", "path": path,
                         "replay": replay})
        self.catch_up()  # queues it here; the other workers see it at their next request or poll
        return 202, {"accepted": True, "path": path, "replay": replay, "model_version": self.served.version,
                     "workers": self.workers}


def _feedback_field(message: str) -> str:
    """The event field a :func:`recmeta_sdk.online.parse_events` message names."""
    if "unknown to the model" in message:
        return "item"
    for f in ("reward", "propensity", "timestamp", "position", "user"):
        if message.startswith(f"event {f}"):
            return f
    return "events"


# ============================================================================ HTTP

class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive
    # TCP_NODELAY: the headers and the body are two writes; with Nagle's algorithm the body
    # would wait for the client's delayed ACK of the headers (40 ms per request on Linux)
    disable_nagle_algorithm = True
    server_version = "recmeta-service/0.1"
    timeout = 60  # seconds an idle keep-alive connection is kept

    def setup(self):
        super().setup()
        self.busy = False
        self.server.connections.add(self)

    def finish(self):
        self.server.connections.discard(self)
        super().finish()

    def log_message(self, fmt, *args):  # access log at DEBUG (not on stderr per request)
        logger.debug("%s %s", self.address_string(), fmt % args)

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def _routes(self) -> dict[str, tuple[str, Callable]]:
        w = self.server.worker
        return {"/recommend": ("POST", w.recommend), "/feedback": ("POST", w.feedback),
                "/reload": ("POST", w.reload), "/health": ("GET", w.health)}

    def _body(self) -> dict:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            self.close_connection = True
            raise BadRequest("Transfer-Encoding", "chunked bodies are not supported: send Content-Length")
        n = self.headers.get("Content-Length")
        if n is None:
            return {}
        try:
            n = int(n)
            if n < 0:
                raise ValueError
        except ValueError:
            self.close_connection = True
            raise BadRequest("Content-Length", f"Content-Length must be an int >= 0, got {n!r}") from None
        if n > MAX_BODY_BYTES:
            self.close_connection = True  # its body is not read
            raise BadRequest("body", f"the body has {n} bytes (at most {MAX_BODY_BYTES})", status=413)
        raw = self.rfile.read(n) if n else b""
        if len(raw) != n:
            self.close_connection = True
            raise BadRequest("body", f"incomplete body ({len(raw)} of {n} bytes)")
        if not raw.strip():
            return {}

        def no_constants(c):
            raise ValueError(f"{c} is not valid JSON")

        try:
            body = json.loads(raw.decode("utf-8"), parse_constant=no_constants)
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise BadRequest("body", f"malformed JSON: {e}") from None
        if not isinstance(body, dict):
            raise BadRequest("body", f"the body must be a JSON object, got {type(body).__name__}")
        return body

    def _dispatch(self, method: str) -> None:
        self.busy = True
        try:
            path = self.path.split("?", 1)[0]
            route = self._routes().get(path)
            status = 200
            try:
                if route is None:
                    raise BadRequest("path", f"no endpoint {path!r}; endpoints: /recommend, /feedback, "
                                             f"/health, /reload", status=404)
                if route[0] != method:
                    raise BadRequest("method", f"{path} takes {route[0]}, not {method}", status=405)
                body = self._body() if method == "POST" else None
                payload = route[1](body)
                if isinstance(payload, tuple):
                    status, payload = payload
                data = json.dumps(payload, default=_json_default, allow_nan=False).encode()
            except BadRequest as e:
                status, payload = e.status, {"error": e.message, "field": e.field}
                data = json.dumps(payload).encode()
            except Exception:  # a server fault (a non-finite score included): 500, traceback in the log
                logger.exception("worker %d: %s %s failed", os.getpid(), method, path)
                status, data = 500, b'{"error": "internal server error (see the service log)"}'
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("X-Worker-Pid", str(os.getpid()))
            if self.close_connection or self.server.stopping:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            self.wfile.write(data)
        finally:
            self.busy = False


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = False  # server_close() waits for the requests in flight
    block_on_close = True

    def __init__(self, sock: socket.socket, worker: Worker):
        super().__init__(sock.getsockname()[:2], Handler, bind_and_activate=False)
        self.socket.close()
        self.socket = sock
        self.worker = worker
        self.connections: set = set()
        self.stopping = False

    def close_idle(self) -> None:
        """Wake the threads waiting on idle keep-alive connections (they end at once)."""
        for h in list(self.connections):
            if not h.busy:
                try:
                    h.connection.shutdown(socket.SHUT_RD)
                except OSError:
                    pass


def serve(args, sock: socket.socket, log: ServiceLog, workers: int,
          on_ready: Callable[[str | None], None], run_start: int = 0, parent_pid: int | None = None) -> int:
    """Run one worker on a listening socket until SIGTERM / SIGINT; returns the exit code.
    ``on_ready(None)`` is called once it serves, ``on_ready(message)`` if it cannot start."""
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    worker = Worker(args.model, log, workers=workers, max_k=args.max_k, poll_s=args.poll, run_start=run_start,
                    parent_pid=parent_pid)
    try:
        worker.start()
    except Exception as e:  # noqa: BLE001 - reported to the parent / the log, exit 1
        logger.error("worker %d: cannot load %s: %s", os.getpid(), args.model, e)
        on_ready(f"{type(e).__name__}: {e}")
        return 1
    sock.setblocking(False)  # a worker that loses the race for a connection goes back to select
    server = Server(sock, worker)

    def on_signal(signum, _frame):
        if not server.stopping:
            logger.info("worker %d: %s: stopping", os.getpid(), signal.Signals(signum).name)
            server.stopping = True
            threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    worker.on_orphan = lambda: on_signal(signal.SIGTERM, None)
    on_ready(None)
    server.serve_forever(poll_interval=0.2)
    server.close_idle()
    server.server_close()  # joins the request threads: the requests in flight finish
    worker.stop()
    logger.info("worker %d: stopped", os.getpid())
    return 0


# ============================================================================ several workers

def supervise(args, sock: socket.socket, log: ServiceLog) -> int:
    """Fork ``args.workers`` workers on the shared socket, restart the ones that die, forward
    SIGTERM / SIGINT and wait for them; returns the exit code."""
    n = args.workers
    run_start = log.size()  # reload records after this are this run's (a restarted worker follows them)
    children: dict[int, float] = {}
    stopping = threading.Event()  # set by the signal handlers (no thread is started here)
    r, w = os.pipe()

    parent = os.getpid()

    def spawn() -> int:
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                os.close(r)

                def on_ready(error: str | None) -> None:
                    os.write(w, f"{os.getpid()} {'ok' if error is None else 'error ' + error}\n".encode())

                code = serve(args, sock, log, n, on_ready, run_start, parent_pid=parent)
            except BaseException:  # the worker's last word
                logger.exception("worker %d: crashed", os.getpid())
            finally:
                logging.shutdown()
                os._exit(code)
        children[pid] = time.time()
        return pid

    def on_signal(signum, _frame):
        stopping.set()

    def reap() -> Iterator[tuple[int, int]]:
        while children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                children.clear()
                return
            if pid == 0:
                return
            children.pop(pid, None)
            yield pid, os.waitstatus_to_exitcode(status)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # import the SDK (and torch) once, before forking: the workers inherit the imported
    # libraries (shared copy-on-write) instead of importing them N times. The parent loads no
    # model and runs no torch op, so no thread pool exists yet when it forks.
    import recmeta_sdk  # noqa: F401

    for _ in range(n):
        spawn()
    # wait until every worker serves (or one failed)
    pending, buf, failed = n, b"", None
    deadline = time.time() + args.start_timeout
    while pending and failed is None and not stopping.is_set():
        if time.time() > deadline:
            failed = f"the workers did not start in {args.start_timeout:g} s"
            break
        if select.select([r], [], [], 0.2)[0]:
            buf += os.read(r, 4096)
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                pid, status, *msg = line.decode().split(" ", 2)
                if status == "ok":
                    pending -= 1
                else:
                    failed = f"worker {pid}: {' '.join(msg)}"
        for pid, code in reap():
            failed = failed or f"worker {pid} exited with {code} while starting"
    code = 0
    if failed is not None:
        logger.error("not started: %s", failed)
        code = 1
        stopping.set()
    elif not stopping.is_set():
        logger.info("listening on http://%s:%d (%d workers, pids %s)", *sock.getsockname()[:2], n,
                    " ".join(map(str, sorted(children))))
    restarts: list = []
    while not stopping.is_set():
        for pid, status in reap():
            if stopping.is_set():
                break
            now = time.time()
            restarts = [t for t in restarts if now - t < 60] + [now]
            if len(restarts) > 3 * n:
                logger.error("workers keep dying (%d restarts in 60 s): stopping", len(restarts))
                code = 1
                stopping.set()
                break
            logger.warning("worker %d exited with %d: starting another", pid, status)
            spawn()
        stopping.wait(0.2)
    for pid in list(children):
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.time() + args.grace
    while children:
        for pid, status in reap():
            if status != 0:
                logger.warning("worker %d exited with %d", pid, status)
                code = code or 1
        if children and time.time() > deadline:
            for pid in list(children):
                logger.warning("worker %d did not stop in %.0f s: killed", pid, args.grace)
                os.kill(pid, signal.SIGKILL)
            deadline = float("inf")
        time.sleep(0.05)
    os.close(r)
    os.close(w)
    logger.info("stopped")
    return code


# ============================================================================ main

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="An HTTP service for a trained recmeta model (standard library only).")
    p.add_argument("--model", required=True, help="model file written by Recommender.save")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080, help="0: any free port (logged)")
    p.add_argument("--workers", type=int, default=1, help="worker processes on one pre-forked socket")
    p.add_argument("--threads", type=int, default=0, help="torch threads per worker (0: cores / workers)")
    p.add_argument("--feedback-log", default=None,
                   help="service log file (feedback and reloads, JSON lines), replayed at start; "
                        "default: an unnamed temporary file")
    p.add_argument("--max-k", type=int, default=1000)
    p.add_argument("--poll", type=float, default=0.1, help="seconds between an idle worker's log reads")
    p.add_argument("--grace", type=float, default=30.0, help="seconds the workers get to stop")
    p.add_argument("--start-timeout", type=float, default=600.0)
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    if args.workers < 1:
        p.error(f"--workers must be >= 1, got {args.workers}")
    if not 0 <= args.port < 65536:
        p.error(f"--port must be in [0, 65535], got {args.port}")
    if args.max_k < 1:
        p.error(f"--max-k must be >= 1, got {args.max_k}")
    if args.poll <= 0:
        p.error(f"--poll must be > 0, got {args.poll}")
    if not os.path.isfile(args.model):
        p.error(f"--model: no file at {args.model!r}")
    if args.threads == 0:
        args.threads = max(1, (os.cpu_count() or 1) // args.workers)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s")
    logging.getLogger("recmeta").setLevel(max(logging.INFO, logging.getLogger().level))
    sock = socket.create_server((args.host, args.port), backlog=512, reuse_port=False)
    log = ServiceLog.open(args.feedback_log)
    if args.workers == 1:
        def on_ready(error: str | None) -> None:
            if error is None:
                logger.info("listening on http://%s:%d (1 worker, pid %d)", *sock.getsockname()[:2], os.getpid())

        code = serve(args, sock, log, 1, on_ready, log.size())
    else:
        code = supervise(args, sock, log)
    sock.close()
    return code


if __name__ == "__main__":
    status = main()
    # the requests are finished and the log flushed: skip the interpreter's teardown of torch
    # (seconds on a busy machine) so that a stop is prompt
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
