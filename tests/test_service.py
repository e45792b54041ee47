"""The web service example (``examples/service.py``), started as a real server process and
called over HTTP: recommend, feedback, health, reload under concurrent clients, bad input,
several workers sharing feedback, and a clean shutdown.

The server and this process serve the same model files with one torch thread each, so every
answer is checked against the same call in process (``rm.load`` of the file), bit for bit.
"""
from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import recmeta_sdk as rm
from recmeta_sdk import online
from recmeta_sdk.model.io import read_model_file

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = Path(__file__).resolve().parents[1]
SERVICE = ROOT / "examples" / "service.py"
# the server imports the recmeta_sdk this process tests (installed or the source folder)
PACKAGE_PARENT = str(Path(rm.__file__).resolve().parents[1])
TINY = {"dim": 16, "hidden": 32, "seq_len": 5, "layers": 1, "heads": 2, "epochs": 1, "batch_size": 64,
        "lr": 0.01, "inner_steps": 1}
N_USERS, N_ITEMS = 60, 40
START_TIMEOUT = 120.0


def _log(seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(N_USERS):
        for t, i in enumerate(rng.choice(N_ITEMS, size=int(rng.integers(4, 12)), replace=False)):
            rows.append((u, int(i), t, float(rng.integers(1, 6))))
    return pd.DataFrame(rows, columns=["user", "item", "timestamp", "reward"])


class Server:
    """A running ``examples/service.py`` process on a free port (``--port 0``, read back from
    its log line ``listening on http://127.0.0.1:PORT``)."""

    def __init__(self, model, *args):
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([PACKAGE_PARENT, os.environ.get("PYTHONPATH", "")]))
        self.proc = subprocess.Popen(
            [sys.executable, str(SERVICE), "--model", str(model), "--port", "0", "--threads", "1",
             "--poll", "0.05", "--grace", "20", *map(str, args)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        self.lines: list[str] = []
        self.port = None
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def wait_ready(self) -> Server:
        if not self._ready.wait(START_TIMEOUT) or self.port is None:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError("the service did not start:\n" + self.log())
        return self

    def _read(self):
        for line in self.proc.stderr:
            self.lines.append(line)
            if "listening on http://" in line:
                self.port = int(line.split("listening on http://", 1)[1].split()[0].rsplit(":", 1)[1])
                self._ready.set()
        self._ready.set()  # exited

    def log(self) -> str:
        return "".join(self.lines)

    def conn(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)

    def call(self, method, path, body=None, *, raw=None, conn=None, headers=None):
        """(status, JSON body, worker pid) of one request (on ``conn``, kept open, or a new one)."""
        c = conn or self.conn()
        try:
            data = raw if raw is not None else None if body is None else json.dumps(body).encode()
            c.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
            r = c.getresponse()
            payload = json.loads(r.read())
            return r.status, payload, int(r.getheader("X-Worker-Pid"))
        finally:
            if conn is None:
                c.close()

    def ok(self, method, path, body=None, **kw):
        status, payload, _ = self.call(method, path, body, **kw)
        assert status == 200, (status, payload)
        return payload

    def wait_health(self, pred, pids=1, timeout=60.0):
        """Poll /health on new connections until ``pred`` holds on ``pids`` distinct workers."""
        seen = {}
        end = time.time() + timeout
        while time.time() < end:
            status, h, pid = self.call("GET", "/health")
            assert status == 200
            if pred(h):
                seen[pid] = h
                if len(seen) >= pids:
                    return seen
            else:
                seen.pop(pid, None)
            time.sleep(0.02)
        raise AssertionError(f"/health never satisfied the condition on {pids} workers: {seen}\n{self.log()}")

    def stop(self, timeout=30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout)
        self._reader.join(5)
        return rc


def _stopped_cleanly(srv: Server) -> None:
    rc = srv.stop()
    assert rc == 0, srv.log()
    assert "Traceback" not in srv.log(), srv.log()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Two model files of the same catalogue (training seeds 1 and 2: different digests), and
    two servers of the first: one worker and two. The servers start while the second model
    trains."""
    d = tmp_path_factory.mktemp("service")
    log = _log()
    files = {"dir": d}
    servers = []
    try:
        for name, seed in (("a", 1), ("b", 2)):
            path = d / f"{name}.recmeta"
            rm.train(log, config=dict(TINY, seed=seed), progress=False).save(path)
            files[name] = path
            files[name + "_version"] = read_model_file(path)[1]["sha256"][:16]
            if name == "a":
                servers = [Server(path), Server(path, "--workers", 2)]
        assert files["a_version"] != files["b_version"]
        for s in servers:
            s.wait_ready()
    except BaseException:
        for s in servers:
            if s.proc.poll() is None:
                s.proc.kill()
                s.proc.wait()
        raise
    yield files, servers[0], servers[1]
    for s in servers:  # (the shutdown tests stop them first; a subset of the tests stops them here)
        _stopped_cleanly(s)


@pytest.fixture(scope="module")
def files(env):
    return env[0]


@pytest.fixture(scope="module")
def server(env):
    return env[1]


@pytest.fixture(scope="module")
def multi(env):
    return env[2]


def _wait_for(cond, timeout=60.0):
    end = time.time() + timeout
    while not cond():
        assert time.time() < end, "timed out"
        time.sleep(0.01)


def _local(files, version):
    """A fresh in-process copy of the model the server reports as ``version``."""
    for name in ("a", "b"):
        if files[name + "_version"] == version:
            return rm.load(files[name])
    raise AssertionError(f"unknown model version {version}")


def _same(payload, recs):
    v = recs.valid
    assert payload["items"] == recs.ids[v].tolist()
    assert payload["scores"] == [float(x) for x in recs.scores[v]]
    if recs.propensities is None:
        assert payload["propensities"] is None
    else:
        assert payload["propensities"] == [float(x) for x in recs.propensities[v]]


# ----------------------------------------------------------------------------- the endpoints

def test_recommend_known_and_new_users_match_the_sdk(server, files):
    local = rm.load(files["a"])
    r = server.ok("POST", "/recommend", {"user": 3, "k": 5})
    assert r["model_version"] == files["a_version"] and r["state_version"] == 0 and r["user"] == 3
    assert len(r["items"]) == 5
    _same(r, local.recommend(3, k=5))
    r = server.ok("POST", "/recommend", {"user": 4, "k": 7, "exclude_seen": False, "exclude": [1, 2],
                                         "popularity_penalty": 0.5})
    _same(r, local.recommend(4, k=7, exclude_seen=False, exclude=[1, 2], popularity_penalty=0.5))
    hist = [5, 9, 11]
    r = server.ok("POST", "/recommend", {"history": hist, "k": 6})
    _same(r, local.recommend(local.adapt(hist), k=6))
    assert "user" not in r and r["state_version"] == 0
    r = server.ok("POST", "/recommend", {"history": {"item": hist, "reward": [1, 0, 5]}, "k": 4,
                                         "explore": "sample", "seed": 7})
    _same(r, local.recommend(local.adapt({"item": hist, "reward": [1, 0, 5]}), k=4, explore="sample", seed=7))
    assert len(r["propensities"]) == 4 and all(0 < p <= 1 for p in r["propensities"])
    r = server.ok("POST", "/recommend", {"history": [5, 777], "unknown": "drop", "k": 3})
    assert r["dropped"] == [777]
    _same(r, local.recommend(local.adapt([5]), k=3))
    r = server.ok("POST", "/recommend", {"user": 3, "k": 2, "explain": True})
    assert [e["item"] for e in r["explanations"]] == r["items"]
    # k beyond the catalogue: the eligible items only (no padding in the answer)
    r = server.ok("POST", "/recommend", {"user": 3, "k": 1000})
    assert len(r["items"]) == N_ITEMS - len(local.user_state(3).history)
    _same(r, local.recommend(3, k=1000))


def test_feedback_then_recommend_reflects_it(server, files):
    local = rm.load(files["a"])
    user = 11
    before = server.ok("POST", "/recommend", {"user": user, "k": 5})
    top = before["items"][0]
    fb = server.ok("POST", "/feedback", {"user": user, "item": top, "reward": 1.0, "propensity": 0.5})
    assert fb == {"accepted": 1, "users": [{"user": user, "state_version": 1}], "model_version": files["a_version"]}
    after = server.ok("POST", "/recommend", {"user": user, "k": 5})
    assert after["state_version"] == 1 and top not in after["items"]
    local.feedback([{"user": user, "item": top, "reward": 1.0, "propensity": 0.5}])
    _same(after, online.recommend(local, user, k=5)[0])
    # a batch, and a user unknown to the training data: served from its online state after it
    events = [{"user": "visitor", "item": 5, "reward": 1}, {"user": "visitor", "item": 8, "reward": 0},
              {"user": user, "item": before["items"][1], "reward": 0, "position": 1, "timestamp": 12.5}]
    fb = server.ok("POST", "/feedback", {"events": events})
    assert fb["accepted"] == 3
    assert fb["users"] == [{"user": "visitor", "state_version": 2}, {"user": user, "state_version": 2}]
    local.feedback(events)
    for u in ("visitor", user):
        r = server.ok("POST", "/recommend", {"user": u, "k": 5})
        assert r["state_version"] == 2
        _same(r, online.recommend(local, u, k=5)[0])


def test_health(server, files):
    h1 = server.ok("GET", "/health")
    assert h1["status"] == "ok" and h1["workers"] == 1 and h1["worker_pid"] == server.proc.pid
    assert Path(h1["model_path"]) == Path(files["a"]).resolve()
    assert h1["model_digest"] == read_model_file(files["a"])[1]["sha256"]
    assert h1["model_version"] == files["a_version"]
    assert (h1["items"], h1["users"]) == (N_ITEMS, N_USERS)
    time.sleep(0.05)
    assert server.ok("GET", "/health?verbose=0")["uptime_s"] > h1["uptime_s"] > 0


BAD = [
    ("/recommend", b'{"user": 3, "k": 5', "body", "malformed JSON"),
    ("/recommend", b"[1, 2]", "body", "JSON object"),
    ("/recommend", b'{"user": 3, "k": NaN}', "body", "NaN"),
    ("/recommend", b"\xff\xfe", "body", "malformed JSON"),
    ("/recommend", {"user": 3, "kk": 5}, "kk", "'kk'"),
    ("/recommend", {"user": 3, "k": 0}, "k", "got 0"),
    ("/recommend", {"user": 3, "k": "5"}, "k", "got '5'"),
    ("/recommend", {"user": 3, "k": True}, "k", "got true"),
    ("/recommend", {"user": 3, "k": 2.5}, "k", "got 2.5"),
    ("/recommend", {"user": 3, "k": 10 ** 6}, "k", "got 1000000"),
    ("/recommend", {"user": 99999}, "user", "99999"),
    ("/recommend", {"user": "3"}, "user", "'3'"),
    ("/recommend", {"user": [3]}, "user", "[3]"),
    ("/recommend", {"user": 3.0}, "user", "3.0"),
    ("/recommend", {}, "user", "exactly one"),
    ("/recommend", {"user": 3, "history": [1]}, "user", "exactly one"),
    ("/recommend", {"history": [1, 777]}, "history", "[777]"),
    ("/recommend", {"history": "1,2"}, "history", "'1,2'"),
    ("/recommend", {"history": [1, None]}, "history[1]", "null"),
    ("/recommend", {"history": {"item": [1, 2], "reward": [1]}}, "history.reward", "[1]"),
    ("/recommend", {"history": {"items": [1]}}, "history.items", "'items'"),
    ("/recommend", {"history": [1], "steps": -1}, "steps", "-1"),
    ("/recommend", {"history": [1], "steps": 5000}, "steps", "5000"),
    ("/recommend", {"user": 3, "steps": 1}, "steps", "history"),
    ("/recommend", {"user": 3, "explore": "greedy"}, "explore", "'greedy'"),
    ("/recommend", {"user": 3, "explore": "sample"}, "seed", "null"),
    ("/recommend", {"user": 3, "explore": "sample", "seed": -1}, "seed", "-1"),
    ("/recommend", {"user": 3, "temperature": -1}, "temperature", "-1"),
    ("/recommend", {"user": 3, "temperature": 1e-30}, "temperature", "1e-30"),
    ("/recommend", {"user": 3, "popularity_penalty": 1e300}, "popularity_penalty", "1e+300"),
    ("/recommend", {"user": 3, "diversity": 1.5}, "diversity", "1.5"),
    ("/recommend", {"user": 3, "exclude_seen": "yes"}, "exclude_seen", "'yes'"),
    ("/recommend", {"user": 3, "exclude": [1, 777]}, "exclude", "[777]"),
    ("/recommend", {"user": 3, "candidates": 5}, "candidates", "5"),
    ("/recommend", {"user": 3, "diversity": 0.5, "explore": "sample", "seed": 1}, "diversity", "diversity"),
    ("/feedback", {"user": 3, "item": 1}, "reward", "'reward'"),
    ("/feedback", {"user": 3, "item": 1, "reward": "1"}, "reward", "'1'"),
    ("/feedback", {"user": 3, "item": 777, "reward": 1}, "item", "[777]"),
    ("/feedback", {"user": {"id": 3}, "item": 1, "reward": 1}, "user", '{"id": 3}'),
    ("/feedback", {"user": 3, "item": 1, "reward": 1, "propensity": 2}, "propensity", "2"),
    ("/feedback", {"user": 3, "item": 1, "reward": 1, "position": -1}, "position", "-1"),
    ("/feedback", {"user": 3, "item": 1, "reward": 1, "clicked": True}, "clicked", "'clicked'"),
    ("/feedback", {"events": []}, "events", "[]"),
    ("/feedback", {"events": [{"user": 3, "item": 1, "reward": 1}, 5]}, "events[1]", "5"),
    ("/feedback", {"events": [{"user": 3, "item": 1, "reward": 1}, {"user": 3, "item": 2, "reward": 1e999}]},
     "body", "Infinity"),
    ("/feedback", {"events": [{"user": 3, "item": 1, "reward": 1}, {"user": 3, "item": 2, "reward": None}]},
     "events[1].reward", "'reward'"),
    ("/reload", {"path": "/no/such/model.recmeta"}, "path", "/no/such/model.recmeta"),
    ("/reload", {"path": 5}, "path", "5"),
    ("/reload", {"replay": "some"}, "replay", "'some'"),
]


def test_bad_input_is_400_naming_the_field(server):
    conn = server.conn()  # one keep-alive connection: a 400 does not end it
    try:
        for path, body, field, shown in BAD:
            raw = body if isinstance(body, bytes) else json.dumps(body).encode()
            status, payload, _ = server.call("POST", path, raw=raw, conn=conn)
            assert status == 400, (path, body, status, payload)
            assert payload["field"] == field, (path, body, payload)
            assert shown in payload["error"], (path, body, payload)
    finally:
        conn.close()
    # nothing of the rejected feedback was applied (user 3 has no online state)
    assert server.ok("POST", "/recommend", {"user": 3})["state_version"] == 0
    assert server.call("GET", "/recommend")[0] == 405
    assert server.call("POST", "/health")[0] == 405
    status, payload, _ = server.call("GET", "/nowhere")
    assert status == 404 and payload["field"] == "path"
    status, payload, _ = server.call("POST", "/recommend", raw=b"{}", headers={"Content-Length": str(1 << 30)})
    assert status == 413 and payload["field"] == "body"
    assert "Traceback" not in server.log()
    assert server.ok("GET", "/health")["status"] == "ok"


def test_reload_under_concurrent_clients_has_no_failed_request(server, files):
    """Four clients call without pause while the model is swapped (and swapped back): every
    request succeeds, each client sees the old version, then only the new one, and every answer
    is the SDK's answer of the version it reports. Feedback survives the reloads (replayed)."""
    server.ok("POST", "/feedback", {"user": 21, "item": 3, "reward": 1.0})
    stop = threading.Event()
    results: list[list] = [[] for _ in range(4)]
    errors: list = []

    def client(b):
        conn = server.conn()
        body = {"user": 20 + b, "k": 5} if b % 2 else {"history": [b, b + 10, b + 20], "k": 5}
        try:
            while not stop.is_set() or len(results[b]) < 10:
                status, r, _ = server.call("POST", "/recommend", body, conn=conn)
                results[b].append((status, r, body))
        except Exception as e:  # noqa: BLE001 - a failed request is what the test counts
            errors.append(repr(e))
        finally:
            conn.close()

    threads = [threading.Thread(target=client, args=(b,)) for b in range(4)]
    for t in threads:
        t.start()
    _wait_for(lambda: all(len(x) >= 3 for x in results) or errors)  # every client served by the old model
    status, r, _ = server.call("POST", "/reload", {"path": str(files["b"])})
    assert status == 202 and r["accepted"] and r["model_version"] == files["a_version"]
    server.wait_health(lambda h: h["model_version"] == files["b_version"] and h["generation"] == 1)
    n_at_swap = [len(x) for x in results]
    _wait_for(lambda: all(len(x) >= n + 3 for x, n in zip(results, n_at_swap)) or errors)
    stop.set()
    for t in threads:
        t.join(60)
    assert not errors, errors
    for b, res in enumerate(results):
        assert all(status == 200 for status, _, _ in res), [r for s, r, _ in res if s != 200][:3]
        versions = [r["model_version"] for _, r, _ in res]
        assert versions[0] == files["a_version"] and versions[-1] == files["b_version"]
        switch = versions.index(files["b_version"])
        assert set(versions[switch:]) == {files["b_version"]}, "a client saw the old model after the new one"
        assert len(res) > n_at_swap[b] > 0
    # every answer is the SDK's answer of the model version it names (user 21 with its feedback)
    local = {v: _local(files, v) for v in (files["a_version"], files["b_version"])}
    for m in local.values():
        m.feedback([{"user": 21, "item": 3, "reward": 1.0}])
    for res in results:
        for _, r, body in (res[0], res[-1]):
            m = local[r["model_version"]]
            if "user" in body:
                assert r["state_version"] == (1 if body["user"] == 21 else 0)
                _same(r, online.recommend(m, body["user"], k=5)[0])
            else:
                _same(r, m.recommend(m.adapt(body["history"]), k=5))
    h = server.ok("GET", "/health")
    assert h["reload"]["state"] == "done" and h["reload"]["replay"] == "all"
    # back to the first model (the other tests' reference)
    assert server.call("POST", "/reload", {"path": str(files["a"])})[0] == 202
    server.wait_health(lambda h: h["model_version"] == files["a_version"] and h["generation"] == 2)
    assert server.ok("POST", "/recommend", {"user": 21})["state_version"] == 1


def test_reload_of_a_bad_file_keeps_serving(server, files):
    bad = files["dir"] / "corrupt.recmeta"
    data = Path(files["a"]).read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    assert server.call("POST", "/reload", {"path": str(bad)})[0] == 202
    h = server.wait_health(lambda h: h["reload"]["state"] == "failed")
    h = next(iter(h.values()))
    assert str(bad) in h["reload"]["error"] and h["model_version"] == files["a_version"]
    assert server.ok("POST", "/recommend", {"user": 3})["model_version"] == files["a_version"]


# ----------------------------------------------------------------------------- several workers

def _by_worker(server, method, path, body, want_pids, pred=lambda r: True, timeout=60.0):
    """Call on new connections until each of ``want_pids`` workers has answered (with ``pred``
    true); returns {pid: answer}."""
    got = {}
    end = time.time() + timeout
    while set(got) < set(want_pids):
        assert time.time() < end, f"workers {set(want_pids) - set(got)} never answered: {got}"
        status, r, pid = server.call(method, path, body)
        assert status == 200, r
        if pred(r):
            got[pid] = r
    return got


def test_workers_share_feedback_and_reloads(multi, files):
    h = multi.wait_health(lambda h: h["workers"] == 2, pids=2)
    pids = sorted(h)
    local = rm.load(files["a"])
    user = 30
    # feedback on one connection (worker A) is served by every worker, B included
    conn = multi.conn()
    try:
        before = multi.ok("POST", "/recommend", {"user": user, "k": 5}, conn=conn)
        status, fb, pid_a = multi.call("POST", "/feedback", {"user": user, "item": before["items"][0], "reward": 1},
                                       conn=conn)
        assert status == 200 and fb["users"][0]["state_version"] == 1
    finally:
        conn.close()
    local.feedback([{"user": user, "item": before["items"][0], "reward": 1}])
    want = online.recommend(local, user, k=5)[0]
    answers = _by_worker(multi, "POST", "/recommend", {"user": user, "k": 5}, pids)
    assert pid_a in answers
    for r in answers.values():
        assert r["state_version"] == 1 and before["items"][0] not in r["items"]
        _same(r, want)
    # concurrent feedback of one user through both workers: every worker applies the same
    # events in the same (log) order, so both serve the same state
    events = [{"user": user, "item": int(i), "reward": float(i % 2)} for i in range(10, 22)]
    errs: list = []

    def send(chunk):
        try:
            for ev in chunk:
                status, r, _ = multi.call("POST", "/feedback", ev)
                assert status == 200, r
        except Exception as e:  # noqa: BLE001 - reported below
            errs.append(repr(e))

    ts = [threading.Thread(target=send, args=(events[j::3],)) for j in range(3)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert not errs, errs
    answers = _by_worker(multi, "POST", "/recommend", {"user": user, "k": 8}, pids)
    first = next(iter(answers.values()))
    assert first["state_version"] == 1 + len(events)
    assert all(r == first for r in answers.values()), answers
    # a reload sent to one worker reaches all of them
    assert multi.call("POST", "/reload", {"path": str(files["b"])})[0] == 202
    multi.wait_health(lambda h: h["model_version"] == files["b_version"], pids=2)
    answers = _by_worker(multi, "POST", "/recommend", {"user": user, "k": 8}, pids)
    assert all(r["model_version"] == files["b_version"] and r["state_version"] == 1 + len(events)
               for r in answers.values())
    # a worker that dies is replaced; the new one replays the log and follows the reload, so
    # it serves what the other one serves
    os.kill(pids[0], signal.SIGKILL)
    h = multi.wait_health(lambda h: h["worker_pid"] not in pids and h["model_version"] == files["b_version"],
                          timeout=120)
    new_pid = next(iter(h))
    assert h[new_pid]["generation"] == 1 and h[new_pid]["service_log"]["feedback_events_applied"] == 1 + len(events)
    again = _by_worker(multi, "POST", "/recommend", {"user": user, "k": 8}, [new_pid, pids[1]])
    assert again[new_pid] == again[pids[1]] == answers[pids[1]]
    assert "exited with -9: starting another" in multi.log()


# ----------------------------------------------------------------------------- shutdown

def _shutdown_under_load(srv):
    """SIGTERM with an idle keep-alive connection and busy clients: exits 0 at once (not after
    the idle timeout), and no request gets anything but a 200 or a closed connection."""
    idle = srv.conn()
    srv.ok("GET", "/health", conn=idle)  # kept open, idle
    statuses: list = []
    stop = threading.Event()

    def client():
        while not stop.is_set():
            try:
                statuses.append(srv.call("POST", "/recommend", {"user": 5, "k": 3})[0])
            except (OSError, http.client.HTTPException):
                statuses.append("closed")
                time.sleep(0.01)

    ts = [threading.Thread(target=client) for _ in range(3)]
    for t in ts:
        t.start()
    _wait_for(lambda: statuses.count(200) >= 3)
    t0 = time.time()
    srv.proc.send_signal(signal.SIGTERM)
    rc = srv.proc.wait(30)
    took = time.time() - t0
    stop.set()
    for t in ts:
        t.join(30)
    idle.close()
    assert rc == 0, srv.log()
    assert took < 15, f"shutdown took {took:.1f} s (an idle keep-alive connection is kept 60 s)"
    assert statuses.count(200) > 0 and set(statuses) <= {200, "closed"}, set(statuses)
    assert "stopped" in srv.log() and "Traceback" not in srv.log(), srv.log()


def test_clean_shutdown_several_workers(multi):
    _shutdown_under_load(multi)


def test_clean_shutdown_one_worker(server):
    _shutdown_under_load(server)


# ----------------------------------------------------------------------------- in process

@pytest.fixture(scope="module")
def svc():
    """examples/service.py imported as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("recmeta_service_example", SERVICE)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # (its dataclass looks its module up)
    try:
        spec.loader.exec_module(mod)
    finally:
        del sys.modules[spec.name]
    return mod


def test_service_log_gives_whole_lines_in_order(svc):
    """Records come back in append order with the offset after each, whatever the read chunk;
    a line still being written is not returned."""
    log = svc.ServiceLog.open(None)
    try:
        spans = [log.append({"t": "feedback", "i": i, "pad": "x" * (i * 7 % 50)}) for i in range(200)]
        os.pwrite(log.fd, b'{"t": "feedb', log.size())  # a writer in the middle of a line
        for chunk in (7, 64, 1 << 20):
            recs = list(log.records(0, log.size(), chunk))
            assert [r["i"] for r, _ in recs] == list(range(200))
            assert [n for _, n in recs] == [end for _, end in spans]
            recs = list(log.records(spans[50][0], spans[120][1], chunk))
            assert [r["i"] for r, _ in recs] == list(range(50, 121))
    finally:
        log.close()


def test_a_named_log_is_replayed_at_start(svc, files, tmp_path):
    """A service started on the log of an earlier run replays its feedback (the same online
    states) but not its reloads (it serves --model)."""
    path = str(tmp_path / "feedback.jsonl")
    log = svc.ServiceLog.open(path)
    w = svc.Worker(files["a"], log)
    w.start()
    try:
        w.feedback({"user": 7, "item": 3, "reward": 1.0})
        w.feedback({"events": [{"user": "v", "item": 4, "reward": 1.0}, {"user": 7, "item": 5, "reward": 0.0}]})
        first = w.recommend({"user": 7, "k": 5})
        assert first["state_version"] == 2
        assert w.reload({"path": str(files["b"])})[0] == 202
    finally:
        w.stop()
        log.close()
    log = svc.ServiceLog.open(path)
    w = svc.Worker(files["a"], log, run_start=log.size())
    w.start()
    try:
        assert w.recommend({"user": 7, "k": 5}) == first
        assert w.recommend({"user": "v", "k": 5})["state_version"] == 1
        assert w.served.version == files["a_version"] and w.health(None)["service_log"]["path"] == path
    finally:
        w.stop()
        log.close()


def test_a_worker_stops_when_its_parent_is_gone(svc, files):
    """A worker of several checks its parent (the supervisor) at every poll: when the parent
    is gone (killed: it could not forward a signal), the worker stops instead of serving on."""
    log = svc.ServiceLog.open(None)
    w = svc.Worker(files["a"], log, poll_s=0.01, parent_pid=os.getppid() + 10 ** 6)  # not the parent
    called = threading.Event()
    w.on_orphan = called.set
    w.start()
    try:
        assert called.wait(30)
    finally:
        w.stop()
        log.close()
    log = svc.ServiceLog.open(None)
    w = svc.Worker(files["a"], log, poll_s=0.01, parent_pid=os.getppid())  # the live parent
    called = threading.Event()
    w.on_orphan = called.set
    w.start()
    try:
        assert not called.wait(0.3)
    finally:
        w.stop()
        log.close()


def test_a_server_fault_is_500_with_a_logged_traceback(svc, caplog):
    """A handler that raises (not bad input) answers 500 with a generic message and logs the
    traceback; the server goes on serving. In process, with a worker that fails on purpose."""
    import socket

    class Failing:
        def recommend(self, body):
            raise RuntimeError("a bug")

        def health(self, body):
            return {"status": "ok"}

        def feedback(self, body):
            return {"score": float("nan")}  # not JSON: a fault too

        reload = health

    sock = socket.create_server(("127.0.0.1", 0))
    srv = svc.Server(sock, Failing())
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05})
    t.start()
    try:
        c = http.client.HTTPConnection("127.0.0.1", sock.getsockname()[1], timeout=30)
        with caplog.at_level("ERROR", logger="recmeta.service"):
            c.request("POST", "/recommend", body=b'{"user": 1}')
            r = c.getresponse()
            assert r.status == 500
            assert json.loads(r.read()) == {"error": "internal server error (see the service log)"}
        assert any("RuntimeError: a bug" in (rec.exc_text or "") for rec in caplog.records)
        with caplog.at_level("ERROR", logger="recmeta.service"):
            c.request("POST", "/feedback", body=b'{}')
            r = c.getresponse()
            assert r.status == 500 and "internal server error" in json.loads(r.read())["error"]
        assert any("Out of range float values are not JSON compliant" in (rec.exc_text or "")
                   for rec in caplog.records)
        c.request("GET", "/health")  # the same connection still serves
        r = c.getresponse()
        assert r.status == 200 and json.loads(r.read()) == {"status": "ok"}
        c.close()
    finally:
        srv.shutdown()
        srv.server_close()
        t.join(10)
