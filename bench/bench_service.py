"""The web service example (``examples/service.py``) under concurrent clients, beside the same
calls in process: the cost of HTTP, JSON and the service's feedback log.

Starts the server (``--workers``, one torch thread per worker by default), then for each of
three calls, with C client threads (each on its own keep-alive connection) sharing a fixed
number of requests:

* ``recommend`` of a known (training) user, top-10;
* ``recommend`` of a new user from a 10-item history (``adapt`` + top-10);
* ``feedback``: one event (a random user and item, reward 0 or 1) per request;

and prints per call p50 / p99 latency (ms) and requests per second, over HTTP and in process
(the same SDK calls on the same model file, in C threads of this process, with the same torch
threads), and their ratios (HTTP / in process). ``CPU/req`` is the server's CPU time (all its
processes, from /proc) per request, ``CPU/call`` this process's CPU time per in-process call:
on a busy shared machine, where the wall-clock times are inflated by other processes' time
slices, their ratio is the steadier measure of what HTTP, JSON and the service log add. The request sequences are seeded and the same
for both. The clients run in this process: on a small machine they take CPU from the server,
as real clients on the same host would.

Usage::

    .venv/bin/python bench/bench_service.py [--model FILE] [--save FILE] [--clients 1,4]
                                            [--requests 1000] [--workers 1] [--threads 1]

Without ``--model`` it trains on MovieLens-100K with ``epochs=1`` (the serving cost does not
depend on the epochs). The load average is printed before and after: on a shared machine,
compare numbers of the same run.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import recmeta_sdk as rm  # noqa: E402 - after the path insert


def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:  # pragma: no cover
        return "n/a"


class Service:
    """``examples/service.py`` as a subprocess on a free port."""

    def __init__(self, model: str, workers: int, threads: int):
        # the server imports the recmeta_sdk this process imported
        parent = str(Path(rm.__file__).resolve().parents[1])
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([parent, os.environ.get("PYTHONPATH", "")]))
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "examples" / "service.py"), "--model", model, "--port", "0",
             "--workers", str(workers), "--threads", str(threads)],
            stderr=subprocess.PIPE, text=True, env=env)
        self.port = None
        self.lines: list = []
        ready = threading.Event()

        def read():
            for line in self.proc.stderr:
                self.lines.append(line)
                if "listening on http://" in line:
                    self.port = int(line.split("listening on http://", 1)[1].split()[0].rsplit(":", 1)[1])
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(600) or self.port is None:
            self.proc.kill()
            raise RuntimeError("the service did not start:\n" + "".join(self.lines))

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(60)


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its children that are alive (from /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(entry) == pid or int(fields[1]) == pid:  # fields[1]: the parent pid
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return total


def _stats(lat: list, wall: float) -> dict:
    a = np.asarray(lat) * 1e3
    return {"p50": float(np.percentile(a, 50)), "p99": float(np.percentile(a, 99)), "rps": len(a) / wall}


def _run(clients: int, bodies: list, call) -> dict:
    """Split ``bodies`` over ``clients`` threads (thread c takes bodies c, c + C, ...); each
    thread makes ``call(state, body)`` with its own state (a connection). Returns the stats."""
    lat: list = [[] for _ in range(clients)]
    errors: list = []
    barrier = threading.Barrier(clients + 1)

    def work(c):
        state = call.open()
        try:
            barrier.wait()
            for body in bodies[c::clients]:
                t0 = time.perf_counter()
                call(state, body)
                lat[c].append(time.perf_counter() - t0)
        except Exception as e:  # noqa: BLE001 - counted and printed
            errors.append(repr(e))
        finally:
            call.close(state)

    ts = [threading.Thread(target=work, args=(c,)) for c in range(clients)]
    for t in ts:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in ts:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} client(s) failed: {errors[:3]}")
    return _stats([x for part in lat for x in part], wall)


class HTTPCall:
    def __init__(self, port: int, path: str):
        self.port, self.path = port, path

    def open(self):
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)

    def close(self, conn):
        conn.close()

    def __call__(self, conn, body):
        conn.request("POST", self.path, body=json.dumps(body), headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        data = r.read()
        if r.status != 200:
            raise RuntimeError(f"{self.path}: {r.status} {data[:200]!r}")


class LocalCall:
    """The SDK call the service makes for the same body, in this process."""

    def __init__(self, model, kind: str):
        self.model, self.kind = model, kind

    def open(self):
        return None

    def close(self, _):
        pass

    def __call__(self, _, body):
        m = self.model
        if self.kind == "feedback":
            m.feedback([body])
        elif "user" in body:
            m.recommend(body["user"], k=body["k"])
        else:
            m.recommend(m.adapt(body["history"]), k=body["k"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="a model file (default: train on ml-100k, epochs=1)")
    ap.add_argument("--save", help="save the trained model here")
    ap.add_argument("--clients", default="1,4", help="comma-separated client thread counts")
    ap.add_argument("--requests", type=int, default=1000, help="requests per call and client count")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker and in process")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    clients = [int(c) for c in args.clients.split(",")]
    tmp = None
    if args.model:
        path = args.model
    else:
        ds = rm.datasets.load("ml-100k")
        t0 = time.perf_counter()
        model = rm.train(ds.interactions, users=ds.users, items=ds.items, config={"epochs": 1}, progress=False)
        print(f"trained on ml-100k (epochs=1) in {time.perf_counter() - t0:.1f} s")
        if args.save:
            path = args.save
        else:
            tmp = tempfile.TemporaryDirectory(prefix="bench-service-")
            path = os.path.join(tmp.name, "model.recmeta")
        model.save(path)
    local = rm.load(path)
    print(f"{local!r}; file {os.path.getsize(path) / 1e6:.1f} MB; {args.workers} worker(s), "
          f"{args.threads} torch thread(s) each; {os.cpu_count()} cores; load average {_load()}")
    rng = np.random.default_rng(args.seed)
    users = [u.item() if hasattr(u, "item") else u for u in local.user_ids]
    items = [i.item() if hasattr(i, "item") else i for i in local.item_ids]
    n = args.requests
    known = [{"user": users[j], "k": 10} for j in rng.integers(0, len(users), n)]
    new = [{"history": [items[j] for j in rng.choice(len(items), 10, replace=False)], "k": 10} for _ in range(n)]
    events = [{"user": users[j], "item": items[i], "reward": float(r)}
              for j, i, r in zip(rng.integers(0, len(users), n), rng.integers(0, len(items), n),
                                 rng.integers(0, 2, n))]
    calls = (("recommend, known user", "/recommend", "recommend", known),
             ("recommend, new user (10-item history)", "/recommend", "recommend", new),
             ("feedback, one event", "/feedback", "feedback", events))
    svc = Service(path, args.workers, args.threads)
    try:
        print(f"{'call':40s} {'clients':>7s} | {'HTTP p50':>9s} {'p99':>8s} {'req/s':>8s} {'CPU/req':>9s} | "
              f"{'in-proc p50':>11s} {'p99':>8s} {'req/s':>8s} {'CPU/call':>9s} | {'p50 x':>6s} {'req/s /':>7s} "
              f"{'CPU x':>6s}")
        # the recommend calls first (for every client count), then feedback: the users served
        # have no online state yet (with one, ``recommend`` reads it instead of recomputing the
        # user's state). The server and the local model get the same events.
        for label, route, kind, bodies in calls:
            for c in clients:
                if kind != "feedback":  # warm-up (a feedback warm-up would change the states)
                    _run(c, bodies[: max(20, n // 20)], HTTPCall(svc.port, route))
                    _run(c, bodies[: max(20, n // 20)], LocalCall(local, kind))
                c0 = _cpu_seconds(svc.proc.pid)
                h = _run(c, bodies, HTTPCall(svc.port, route))
                h_cpu = (_cpu_seconds(svc.proc.pid) - c0) / len(bodies) * 1e3
                c0 = time.process_time()
                lo = _run(c, bodies, LocalCall(local, kind))
                lo_cpu = (time.process_time() - c0) / len(bodies) * 1e3
                print(f"{label:40s} {c:7d} | {h['p50']:7.3f}ms {h['p99']:6.2f}ms {h['rps']:8.0f} {h_cpu:7.3f}ms | "
                      f"{lo['p50']:9.3f}ms {lo['p99']:6.2f}ms {lo['rps']:8.0f} {lo_cpu:7.3f}ms | "
                      f"{h['p50'] / lo['p50']:5.2f}x {lo['rps'] / h['rps']:6.2f}x {h_cpu / lo_cpu:5.2f}x")
    finally:
        rc = svc.stop()
        if tmp is not None:
            tmp.cleanup()
    print(f"service exit status {rc}; load average {_load()}")
    return 0 if rc == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
