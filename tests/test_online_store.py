"""The online store: the model view it reads, its pluggable bounded backend (LRU, bytes, TTL,
counted evictions, a host's own backend), the sparse per-user correction, the feedback fast path
(same states as the pandas path) and concurrent feedback on one store."""
import pickle
import re
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import recmeta_sdk as rm
from recmeta_sdk import online
from recmeta_sdk.model.view import ModelView
from recmeta_sdk.online import engine, posterior
from recmeta_sdk.online.store import MemoryBackend, StateBackend

TINY = {"dim": 16, "hidden": 32, "seq_len": 5, "layers": 1, "heads": 2, "epochs": 3, "batch_size": 32,
        "lr": 0.01, "inner_steps": 1}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _log(n_users=60, n_items=40, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        for t, i in enumerate(rng.choice(n_items, size=6, replace=False)):
            rows.append((f"u{u}", int(i), t, 1.0))
    return pd.DataFrame(rows, columns=["user", "item", "timestamp", "reward"])


@pytest.fixture(scope="module")
def model():
    return rm.train(_log(), config=TINY, progress=False)


def _events(model, n, users, seed):
    rng = np.random.default_rng(seed)
    ids = model.item_ids
    return [(users[j % len(users)], int(ids[rng.integers(len(ids))]), float(rng.random() < 0.4) * 2.0,
             float(rng.uniform(0.05, 1.0)), float(j), int(rng.integers(3))) for j in range(n)]


def _same(a, b):
    """Two OnlineUser versions hold the same state, bit for bit."""
    assert a.version == b.version and a.known == b.known and a.steps == b.steps
    for name in ("vector", "base", "gamma", "delta", "seen", "seen_rewards", "enc_items", "enc_rewards"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    ia, ib = a.state.item_bias, b.state.item_bias
    assert (ia is None) == (ib is None)
    if ia is not None:
        np.testing.assert_array_equal(ia, ib)
    assert a.state.history_ids == b.state.history_ids and a.exclude_ids() == b.exclude_ids()


# ------------------------------------------------------------------ the model view

def test_recommender_offers_the_model_view_and_the_online_layer_reads_nothing_else(model):
    assert isinstance(model, ModelView)
    from recmeta_sdk import training

    for pkg in (online, training):
        src = "\n".join(p.read_text() for p in Path(pkg.__file__).parent.glob("*.py"))
        private = sorted(set(re.findall(r"model\._[a-zA-Z]\w*", src)))
        assert private == [], f"{pkg.__name__} reads private model attributes: {private}"
    # the view's answers are the model's
    assert model.item_position(model.item_ids[3]) == 3 and model.item_position(10**9) == -1
    assert model.item_position("not-an-item") == -1
    np.testing.assert_array_equal(model.item_positions(model.item_ids[[5, 1]]), [5, 1])
    assert model.user_position("u7") >= 0 and model.user_position("nobody") == -1
    assert model.user_position(True) == -1
    items, rewards = model.user_history(model.user_position("u7"))
    assert list(model.item_ids[items]) == list(_log().query("user == 'u7'")["item"])
    assert rewards.dtype == np.float32 and len(rewards) == len(items)
    st = model.adapt([])
    np.testing.assert_array_equal(model.score_all(st), model.score_all(st))
    assert model.score_all(st).shape == (model.n_items,)


# ------------------------------------------------------------------ the backend

def test_memory_backend_lru_by_users_and_bytes_counts_evictions():
    class V:
        def __init__(self, n):
            self.nbytes = n

    b = MemoryBackend(max_users=3, max_bytes=None)
    assert isinstance(b, StateBackend)
    for u in "abc":
        b.put(u, V(10))
    assert b.get("a") is not None  # a is now the most recently used
    b.put("d", V(10))
    assert b.get("b") is None and b.get("a") is not None and len(b) == 3
    assert b.stats()["evictions"] == 1 and b.stats()["bytes"] == 30
    # by bytes: the least recently used go until the rest fits
    b = MemoryBackend(max_users=None, max_bytes=100)
    for u in "abcd":
        b.put(u, V(30))
    assert [u for u, _ in b.items()] == ["b", "c", "d"] and b.nbytes == 90 and b.evictions == 1
    b.put("c", V(80))  # a rewrite changes the size: b and d make room
    assert [u for u, _ in b.items()] == ["c"] and b.nbytes == 80 and b.evictions == 3
    b.put("big", V(500))  # alone larger than the budget: kept, alone
    assert [u for u, _ in b.items()] == ["big"] and b.evictions == 4
    assert b.delete("big") and not b.delete("big") and len(b) == 0 and b.nbytes == 0
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="max_users"):
            MemoryBackend(max_users=bad)
    for bad in (0, -2.0, float("inf"), True):
        with pytest.raises(ValueError, match="ttl"):
            MemoryBackend(ttl=bad)


def test_memory_backend_ttl_with_an_injected_clock():
    now = [100.0]
    b = MemoryBackend(ttl=10.0, clock=lambda: now[0])
    b.put("a", 1)
    now[0] = 105.0
    b.put("b", 2)
    assert b.get("a") == 1  # a read does not extend the life of a value
    now[0] = 110.0
    assert [u for u, _ in b.items()] == ["b"]
    assert b.get("a") is None and b.stats()["expirations"] == 1 and len(b) == 1
    now[0] = 114.9
    assert b.get("b") == 2
    now[0] = 115.0
    assert b.get("b") is None and b.expirations == 2 and len(b) == 0


def test_store_eviction_falls_back_to_the_trained_state_and_is_counted(model):
    st = online.OnlineStore(model, backend=MemoryBackend(max_users=2))
    st.feedback([("u1", int(model.item_ids[0]), 1.0)])
    st.feedback([("u2", int(model.item_ids[1]), 1.0)])
    st.feedback([("new", int(model.item_ids[2]), 1.0)])  # u1 is the least recently used: out
    stats = st.stats()
    assert stats["users"] == 2 and stats["backend"]["evictions"] == 1 and stats["events"] == 3
    assert st.current("u1") is None and st.current("u2") is not None
    # served as if it had no feedback: a training user from its training state
    model.default_online_store = st
    try:
        recs, version = online.recommend(model, "u1", k=5)
        assert version == 0
        np.testing.assert_array_equal(recs.ids, model.recommend(model.user_state("u1"), k=5).ids)
        # its next event starts again from the training state: version 1 of a fresh store
        st.feedback([("u1", int(model.item_ids[4]), 1.0)])
        fresh = online.OnlineStore(model)
        fresh.feedback([("u1", int(model.item_ids[4]), 1.0)])
        _same(st.current("u1"), fresh.current("u1"))
    finally:
        model.default_online_store = None
    assert len(st.log()) == 4  # the log keeps every event
    assert st.forget("u1") and st.current("u1") is None and not st.forget("u1")


def test_store_ttl_with_an_injected_clock(model):
    now = [0.0]
    st = model.online_store(backend=MemoryBackend(ttl=60.0, clock=lambda: now[0]))
    st.feedback([("n", int(model.item_ids[3]), 1.0)])
    now[0] = 59.0
    assert st.current("n").version == 1
    now[0] = 60.0
    assert st.current("n") is None and st.stats()["backend"]["expirations"] == 1
    st.feedback([("n", int(model.item_ids[5]), 1.0)])
    assert st.current("n").version == 1  # a new user again: adapt of this event
    np.testing.assert_array_equal(st.current("n").vector, model.adapt({"item": [model.item_ids[5]], "reward": [1.0]}).vector)


class PickleBackend:
    """A host's backend that keeps serialised values (like an external key-value store)."""

    def __init__(self):
        self.data = {}
        self.lock = threading.Lock()
        self.puts = 0

    def get(self, user):
        with self.lock:
            raw = self.data.get(user)
        return None if raw is None else pickle.loads(raw)

    def put(self, user, value):
        raw = pickle.dumps(value)
        with self.lock:
            self.data[user] = raw
            self.puts += 1

    def delete(self, user):
        with self.lock:
            return self.data.pop(user, None) is not None

    def __len__(self):
        return len(self.data)

    def items(self):
        with self.lock:
            snap = list(self.data.items())
        return iter([(u, pickle.loads(r)) for u, r in snap])


def test_a_host_backend_that_serialises_values_gives_the_same_states(model):
    host = PickleBackend()
    a = model.online_store(backend=host)
    b = model.online_store()
    evs = _events(model, 40, ["u3", "h1", "u9", "h2"], seed=5)
    for j in range(0, len(evs), 3):
        a.feedback(evs[j:j + 3])
        b.feedback(evs[j:j + 3])
    assert host.puts >= 14 and len(host) == 4 and len(pickle.dumps(host.data)) < 200_000
    for u in ("u3", "h1", "u9", "h2"):
        _same(a.current(u), b.current(u))
    model.default_online_store = a
    try:  # recommend reads the host's backend
        np.testing.assert_array_equal(model.recommend("h1", k=5).ids, online.recommend(model, "h1", k=5)[0].ids)
    finally:
        model.default_online_store = None
    pd.testing.assert_frame_equal(a.log(), b.log())
    with pytest.raises(TypeError, match="StateBackend"):
        model.online_store(backend={})


# ------------------------------------------------------------------ the sparse correction

def test_sparse_correction_equals_the_dense_one_on_random_data():
    rng = np.random.default_rng(3)
    U, N = 50, 300
    lens = rng.integers(1, 30, U)
    offsets = np.concatenate([[0], np.cumsum(lens)])
    items = np.concatenate([rng.choice(N, size=n, replace=False) for n in lens])
    rewards = rng.uniform(0, 3, len(items)).astype(np.float32)
    post = posterior.RewardPosterior(offsets, items, rewards, N, reward_scale=1.5)
    for trial in range(20):
        n = int(rng.integers(1, 40))
        obs = rng.integers(0, N, n)  # with repeats: the last reward of an item counts
        y = rng.uniform(0, 2, n)
        lam = float(rng.uniform(0.01, 1.0))
        dense = post.correction(obs, y, lam)
        ref = post.columns(np.unique(obs)) @ np.linalg.solve(
            post.columns(np.unique(obs))[np.unique(obs)] + lam * np.eye(len(np.unique(obs))),
            np.array([y[np.flatnonzero(obs == a)[-1]] for a in np.unique(obs)]) - post.mu[np.unique(obs)])
        np.testing.assert_allclose(dense, ref, rtol=1e-9, atol=1e-12)
        it, coef = post.coefficients(obs, y, lam)
        assert len(it) == len(np.unique(obs)) and coef.shape == it.shape
        for with_prior in (False, True):
            sc = posterior.SparseCorrection(it, coef, 7.25, with_prior)
            want = (7.25 * (dense + post.mu if with_prior else dense)).astype(np.float32)
            np.testing.assert_array_equal(post.dense(sc), want)  # bit for bit
            assert sc.nbytes == 16 * len(it)


def test_per_user_memory_is_sparse_and_reported(model):
    st = model.online_store()
    evs = [("s", int(model.item_ids[j % model.n_items]), float(j % 3 == 0)) for j in range(30)]
    st.feedback(evs)
    cur = st.current("s")
    assert cur.correction is not None and cur.state.item_bias.shape == (model.n_items,)
    # what the store keeps: the histories, two states, phi (twice while steps are pending: the
    # stored ones and the computed ones), the pending steps and the touched items' coefficients
    # (the reward posterior's and the in-session evidence's)
    d = model.dim
    cfg = model.config
    ev_window = posterior.evidence_window(cfg.feedback_evidence_decay, cfg.feedback_window)
    want = 4 * 4 * d * (1 + bool(cur.pending)) + 8 * len(cur.pending) + cur.seen.nbytes + \
        cur.seen_rewards.nbytes + cur.enc_items.nbytes + cur.enc_rewards.nbytes + 16 * len(np.unique(cur.seen)) + \
        16 * len(np.unique(cur.seen[-ev_window:])) * (cfg.feedback_evidence > 0)
    assert cur.nbytes == want
    stats = st.stats()
    assert stats["bytes_per_user"] == cur.nbytes and stats["backend"]["bytes"] == cur.nbytes
    # the dense bias lives only in the bounded served-state cache
    assert stats["served_users"] == 1 and stats["served_bytes"] >= 4 * model.n_items
    small = online.OnlineStore(model, served_cache_bytes=0)
    small.feedback(evs)
    assert small.stats()["served_users"] == 0
    np.testing.assert_array_equal(small.current("s").state.item_bias, cur.state.item_bias)
    # pickled without the store; unbound versions say so
    back = pickle.loads(pickle.dumps(cur))
    with pytest.raises(RuntimeError, match="not bound"):
        _ = back.state


# ------------------------------------------------------------------ the fast path

@pytest.mark.parametrize("update,encode", [("step", "positive"), ("readapt", "all")])
def test_fast_path_gives_the_states_and_log_of_the_pandas_path(model, update, encode):
    users = ["u2", "f1", 17, "u30", "f2"]
    evs = _events(model, 60, users, seed=11)
    fast = online.OnlineStore(model, update=update, encode=encode)
    slow = online.OnlineStore(model, update=update, encode=encode)
    for j in range(0, len(evs), 4):
        chunk = evs[j:j + 4]
        assert engine._fast_events(model, chunk) is not None
        fast.feedback(chunk if j % 8 else [dict(zip(online.EVENT_COLUMNS, e)) for e in chunk])
        slow.feedback(pd.DataFrame(chunk, columns=list(online.EVENT_COLUMNS)))
    for u in users:
        _same(fast.current(u), slow.current(u))
    pd.testing.assert_frame_equal(fast.log(), slow.log())


def test_fast_path_is_taken_and_odd_input_goes_the_pandas_way(model, monkeypatch):
    st = model.online_store()
    called = []
    real = engine.parse_events
    monkeypatch.setattr(engine, "parse_events", lambda *a, **k: called.append(1) or real(*a, **k))
    st.feedback([("a", int(model.item_ids[1]), 1.0)])
    st.feedback([{"user": "a", "item": np.int64(model.item_ids[2]), "reward": np.float32(0.5),
                  "position": 2.0}])
    assert called == []
    # what the fast path does not take plainly goes through pandas, which decides (and names errors)
    for odd in ([("a", int(model.item_ids[1]), "1.5")], [("a", int(model.item_ids[1]), True)],
                [(np.str_("a"), int(model.item_ids[1]), 1.0, None, None, float("nan"))]):
        assert engine._fast_events(model, odd) is None
        st.feedback(odd)
    assert len(called) == 3 and st.current("a").version == 5
    for bad, err in (([("a", 10**6, 1.0)], "unknown to the model"), ([("a", 1, 1.0, 0.0)], "propensity"),
                     ([("a", 1, 1.0, 0.5, float("inf"))], "timestamp"), ([("a", 1, 1e39)], "finite"),
                     ([(1.5, 1, 1.0)], "user ids"), ([("a", 1, 1.0, 0.5, 1.0, -1)], "positions")):
        with pytest.raises(ValueError, match=err):
            st.feedback(bad)
    assert st.current("a").version == 5 and len(st.log()) == 5


# ------------------------------------------------------------------ concurrency

def test_concurrent_feedback_on_one_store(model):
    """8 threads, overlapping users, one store: no lost update; each user's final state is the
    sequential replay of its events in the log's order; a bounded store under the same load
    stays within its limits and counts what it evicts."""
    users = ["u1", "u2", "c1", "c2", "c3", 5]
    per_thread = [_events(model, 12, users[t % 3:] + users[:t % 3], seed=100 + t) for t in range(8)]
    for backend in (None, MemoryBackend(max_users=3)):
        st = online.OnlineStore(model, backend=backend)
        barrier = threading.Barrier(8)
        errors = []

        def run(evs, st=st, barrier=barrier, errors=errors):
            try:
                barrier.wait()
                for j in range(0, len(evs), 2):
                    st.feedback(evs[j:j + 2])
            except Exception as e:  # noqa: BLE001  (any failure is reported below)
                errors.append(e)

        threads = [threading.Thread(target=run, args=(evs,)) for evs in per_thread]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        log = st.log()
        assert len(log) == 8 * 12
        if backend is None:
            replay = online.OnlineStore(model)
            for row in log.itertuples(index=False, name=None):
                replay.feedback([row])
            for u in users:
                _same(st.current(u), replay.current(u))
                assert st.current(u).version == int((log["user"] == u).sum())
        else:
            s = backend.stats()
            assert s["users"] <= 3 and s["evictions"] >= 3
            assert s["bytes"] == sum(v.nbytes for _, v in backend.items())


def test_check_events_validates_without_applying(model):
    from recmeta_sdk import online

    good = [("a", int(model.item_ids[1]), 1.0), ("b", int(model.item_ids[2]), 0.0, 0.5)]
    assert online.check_events(model, good) == 2
    assert online.check_events(model, [{"user": "a", "item": int(model.item_ids[3]), "reward": 1.0}]) == 1
    for bad, err in (([("a", 10**6, 1.0)], "unknown to the model"), ([("a", 1, 1.0, 0.0)], "propensity"),
                     ([("a", 1, 1e39)], "finite"), ([(1.5, 1, 1.0)], "user ids")):
        with pytest.raises(ValueError, match=err):
            online.check_events(model, bad)
    assert online.current(model, "a") is None  # nothing applied
