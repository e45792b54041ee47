"""Recommender.feedback: validation, per-event online updates visible in the next
recommendation, the feedback log, train(..., resume=model), and concurrent readers/writers."""
import threading
import time

import numpy as np
import pandas as pd
import pytest
import torch

import recmeta_sdk as rm
from recmeta_sdk import online

TINY = {"dim": 16, "hidden": 32, "seq_len": 5, "layers": 1, "heads": 2, "epochs": 6, "batch_size": 32,
        "lr": 0.01, "inner_steps": 1}


from _helpers import segments_log as _segments_log  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")




@pytest.fixture(scope="module")
def model():
    return rm.train(_segments_log(), config=TINY, progress=False)


def _fresh(model):
    """A model object sharing the weights but with its own (empty) online store."""
    return online.OnlineStore(model)


def test_feedback_validation(model):
    st = _fresh(model)
    with pytest.raises(ValueError, match="unknown to the model.*999"):
        st.feedback([{"user": "a", "item": 999, "reward": 1.0}])
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="propensity"):
            st.feedback([{"user": "a", "item": 3, "reward": 1.0, "propensity": bad}])
    for bad in (np.nan, np.inf):
        with pytest.raises(ValueError, match="reward must be finite"):
            st.feedback([("a", 3, bad, 0.5)])
    with pytest.raises(ValueError, match="unknown event field"):
        st.feedback([{"user": "a", "item": 3, "reward": 1.0, "click": 1}])
    with pytest.raises(TypeError):
        st.feedback({"user": "a", "item": 3, "reward": 1.0})
    with pytest.raises(ValueError, match="'reward'"):
        st.feedback(pd.DataFrame({"user": ["a"], "item": [3]}))
    assert st.current("a") is None and len(st.log()) == 0  # nothing half-applied
    # the three accepted forms give the same state
    forms = [
        [("a", 3, 1.0, 0.25, 10.0, 1)],
        [{"user": "a", "item": 3, "reward": 1.0, "propensity": 0.25, "timestamp": 10.0, "position": 1}],
        pd.DataFrame({"user": ["a"], "item": [3], "reward": [1.0], "propensity": [0.25], "timestamp": [10.0],
                      "position": [1]}),
    ]
    vecs = []
    for f in forms:
        s = _fresh(model)
        s.feedback(f)
        vecs.append(s.current("a").state.vector)
        log = s.log()
        assert log.iloc[0].tolist() == ["a", 3, 1.0, 0.25, 10.0, 1]
    assert all(np.array_equal(vecs[0], v) for v in vecs[1:])


def test_new_user_first_event_is_adapt_and_readapt_mode_is_adapt(model):
    st = _fresh(model)
    out = st.feedback([("n", 12, 1.0, 0.1)])
    ref = model.adapt({"item": [12], "reward": [1.0]})
    assert out["n"].version == 1 and out["n"].known is False
    np.testing.assert_array_equal(out["n"].state.vector, ref.vector)
    # update="readapt": every version is adapt() of the positive history, bit for bit
    ra = online.OnlineStore(model, update="readapt")
    ra.feedback([("n", 12, 1.0, 0.1), ("n", 4, 0.0, 0.1), ("n", 17, 2.0, 0.1)])
    ref = model.adapt({"item": [12, 17], "reward": [1.0, 2.0]})
    cur = ra.current("n")
    np.testing.assert_array_equal(cur.state.vector, ref.vector)
    assert cur.version == 3
    assert list(cur.state.history_ids) == [12, 17] and list(cur.seen_ids) == [12, 4, 17]
    assert cur.exclude_ids() == [4]  # the miss is excluded from serving too
    # encode="all" reads the miss as well
    al = online.OnlineStore(model, update="readapt", encode="all")
    al.feedback([("n", 12, 1.0, 0.1), ("n", 4, 0.0, 0.1)])
    np.testing.assert_array_equal(al.current("n").state.vector,
                                  model.adapt({"item": [12, 4], "reward": [1.0, 0.0]}).vector)


def test_step_update_takes_one_gradient_step_per_event(model):
    st = _fresh(model)
    st.feedback([("n", 12, 1.0, 0.1)])
    v1 = st.current("n")
    st.feedback([("n", 15, 1.0, 0.1)])
    v2 = st.current("n")
    assert v2.version == 2 and v2.state.steps == v1.state.steps + 1
    assert not np.array_equal(v1.gamma, v2.gamma)
    # the step lowers the support loss of the new history at the new encoder state
    net = model._net
    h = torch.from_numpy(v2.state.base)[None]

    def support_loss(g, d):
        hp = net.apply_phi(h, torch.from_numpy(g)[None], torch.from_numpy(d)[None])
        logp = torch.log_softmax(net.logits(hp, model._V), 1)[0]
        return float(-(logp[[12, 15]]).mean())

    assert support_loss(v2.gamma, v2.delta) < support_loss(v1.gamma, v1.delta)
    # a miss takes no step (encode="positive"): it joins the exclusion list and the reward
    # posterior (the state's item bias), not the encoder
    st.feedback([("n", 3, 0.0, 0.1)])
    v3 = st.current("n")
    assert v3.version == 3 and 3 in v3.seen_ids and 3 not in v3.state.history_ids
    np.testing.assert_array_equal(v3.state.vector, v2.state.vector)  # zero reward, zero gradient: no step
    assert v3.state.steps == v2.state.steps
    assert not np.array_equal(v3.state.item_bias, v2.state.item_bias)


def test_feedback_is_visible_in_the_next_recommendation(model):
    def share(ids, seg):
        return float(np.mean((ids >= seg * 10) & (ids < seg * 10 + 10)))

    cold = model.recommend(model.adapt([]), k=10, exclude_seen=False).ids
    for seg in range(3):
        st = online.OnlineStore(model)
        st.feedback([(f"n{seg}", seg * 10 + 1, 1.0, 0.1)])
        st.feedback([(f"n{seg}", seg * 10 + 2, 1.0, 0.1)])
        recs = model.recommend(st.current(f"n{seg}").state, k=10).ids
        assert seg * 10 + 1 not in recs and seg * 10 + 2 not in recs  # seen items excluded
        # the clicked segment gains share over the cold start and leads every other segment
        assert share(recs, seg) > share(cold, seg), (seg, recs, cold)
        assert share(recs, seg) > max(share(recs, o) for o in range(3) if o != seg), (seg, recs)


def test_known_user_starts_from_its_training_state(model):
    st = _fresh(model)
    st.feedback([("u4", 25, 1.0, 0.3)])
    prior = st._prior("u4")
    np.testing.assert_array_equal(prior.state.vector, model.user_state("u4").vector)
    cur = st.current("u4")
    assert cur.known and cur.state.user == "u4" and cur.version == 1
    assert len(cur.state.history) == len(prior.state.history) + 1 and cur.state.history_ids[-1] == 25
    st.feedback([("u4", 26, 0.0, 0.3)])  # a miss: seen, not read
    cur = st.current("u4")
    assert cur.seen_ids[-1] == 26 and cur.state.history_ids[-1] == 25 and cur.exclude_ids() == [26]


def test_model_feedback_method_and_log(model):
    m = rm.train(_segments_log(n_users=30, seed=1), config={**TINY, "epochs": 1}, progress=False)
    out = m.feedback([("a", 3, 1.0, 0.5, 1.0, 0), ("b", 7, 0.0, 0.2, 2.0, 1), ("a", 5, 1.0, 0.5, 3.0, 0)])
    assert set(out) == {"a", "b"} and out["a"].version == 2
    assert online.current(m, "a") is out["a"]
    log = online.feedback_log(m)
    assert log["item"].tolist() == [3, 5, 7] or log["item"].tolist() == [3, 7, 5] or \
        sorted(log["item"].tolist()) == [3, 5, 7]
    assert log[log["user"] == "a"]["item"].tolist() == [3, 5]  # per-user order kept
    recs, version = online.recommend(m, "a", 4)
    assert version == 2 and not {3, 5} & set(recs.ids.tolist())
    m.feedback([("a", int(recs.ids[0]), 0.0, 0.5)])  # a miss is excluded from the next slate
    recs2, version = online.recommend(m, "a", 4)
    assert version == 3 and recs.ids[0] not in recs2.ids


def test_resume_is_an_off_policy_update_from_the_log(model):
    m = rm.train(_segments_log(seed=2), config={**TINY, "epochs": 3}, progress=False)
    before = {k: v.clone() for k, v in m._net.state_dict().items()}
    rng = np.random.default_rng(5)
    events = []
    # new users keep clicking item 29 (shown with a small logged propensity) after items of segment 0
    for u in range(40):
        for t, i in enumerate(rng.choice(10, size=3, replace=False)):
            events.append((f"x{u}", int(i), 1.0, 0.1, float(t), 0))
        events.append((f"x{u}", 29, 1.0, 0.05, 9.0, 0))
    m.feedback(events)
    probe = m.adapt({"item": [1, 2, 3]})
    p_old = torch.softmax(torch.from_numpy(m.recommend(probe, k=m.n_items, exclude_seen=False).scores
                                           .astype(np.float64)), 0)
    ids_old = m.recommend(probe, k=m.n_items, exclude_seen=False).ids
    new = rm.train(None, resume=m, config={"epochs": 8, "lr": 0.01}) if _has_resume() else \
        online.resume_train(m, config={"epochs": 8, "lr": 0.01}, progress=False)
    # the old snapshot is untouched
    for k, v in m._net.state_dict().items():
        assert torch.equal(v, before[k]), k
    pn = new.adapt({"item": [1, 2, 3]})
    sc = new.recommend(pn, k=new.n_items, exclude_seen=False)
    p_new = torch.softmax(torch.from_numpy(sc.scores.astype(np.float64)), 0)
    pi_old = float(p_old[list(ids_old).index(29)])
    pi_new = float(p_new[list(sc.ids).index(29)])
    assert pi_new > 2 * pi_old, (pi_old, pi_new)
    # the log and the users' online states carry over (rebuilt with the new weights)
    assert len(online.feedback_log(new)) == len(events)
    cur = online.current(new, "x3")
    assert cur.version == 4 and cur.state.history_ids[-1] == 29
    with pytest.raises(ValueError, match="propensity"):
        online.resume_train(m, pd.DataFrame({"user": ["a", "a"], "item": [1, 2], "reward": [1.0, 1.0]}))
    with pytest.raises(ValueError, match="config.dim"):
        online.resume_train(m, config={"dim": 8})


def _has_resume():
    import inspect

    return "resume" in inspect.signature(rm.train).parameters


def test_concurrent_recommend_and_feedback_see_whole_versions(model):
    """8 threads: 4 writers feed events, 4 readers recommend; every answer is rechecked
    single-threaded against a replay of the log up to the version it came from."""
    users = [f"c{j}" for j in range(4)] + ["u0", "u1"]  # new and known users
    st = online.OnlineStore(model)
    n_writes, n_reads = 40, 60
    errors = []
    observed = []  # (user, version, vector bytes, ids, scores)
    barrier = threading.Barrier(8)
    writers_left = [4]
    writers_done = threading.Event()
    lock = threading.Lock()

    def writer(w):
        rng = np.random.default_rng(100 + w)
        try:
            barrier.wait()
            for _ in range(n_writes):
                u = users[int(rng.integers(len(users)))]
                st.feedback([(u, int(rng.integers(model.n_items)), float(rng.integers(2)), 0.2)])
        except Exception as e:  # noqa: BLE001 - surfaced by the assert below
            errors.append(e)
        finally:
            with lock:
                writers_left[0] -= 1
                if writers_left[0] == 0:
                    writers_done.set()

    def reader(r):
        rng = np.random.default_rng(200 + r)
        last = {}
        try:
            barrier.wait()
            got = 0
            # Read for as long as the writers write (a read is far quicker than a write:
            # readers that stopped after n_reads could all finish before the writers got
            # going on a loaded machine), and at least n_reads times.
            while got < n_reads or not writers_done.is_set():
                u = users[int(rng.integers(len(users)))]
                cur = st.current(u)
                time.sleep(0.0005)
                if cur is None:
                    continue
                got += 1
                recs = model.recommend(cur.state, k=5)
                if cur.version < last.get(u, 0):
                    errors.append(AssertionError(f"version went back for {u}"))
                last[u] = cur.version
                observed.append((u, cur.version, cur.state.vector.tobytes(), recs.ids.copy(), recs.scores.copy()))
        except Exception as e:  # noqa: BLE001 - surfaced by the assert below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
    threads += [threading.Thread(target=reader, args=(r,)) for r in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    log = st.log()
    assert len(log) == 4 * n_writes
    # replay each user's events in log order, single-threaded, on a fresh store
    replay = online.OnlineStore(model)
    versions = {}
    for u in users:
        evs = log[log["user"] == u]
        versions[u] = {0: None}
        for row in evs.itertuples(index=False):
            replay.feedback([(row.user, row.item, row.reward, row.propensity)])
            cur = replay.current(u)
            versions[u][cur.version] = cur
        final = st.current(u)
        if len(evs):
            assert final.version == len(evs)
            np.testing.assert_array_equal(final.state.vector, versions[u][len(evs)].state.vector)
    mismatches = 0
    for u, ver, vec, ids, scores in observed:
        ref = versions[u][ver]
        recs = model.recommend(ref.state, k=5)
        if (ref.state.vector.tobytes() != vec or not np.array_equal(recs.ids, ids)
                or not np.array_equal(recs.scores, scores)):
            mismatches += 1
    print(f"concurrency: 8 threads, {4 * n_writes} feedback + {len(observed)} checked recommend calls, "
          f"{mismatches} mismatches")
    assert len(observed) >= 4 * n_reads
    assert len({(u, v) for u, v, *_ in observed}) >= 10  # readers saw many versions while writers ran
    assert mismatches == 0


def test_online_recommend_reports_the_version_it_served(model, monkeypatch):
    """online.recommend reads the user's state once: a feedback event published between its
    read of the store and the scoring (forced here inside that read) is not served under the
    old version number. Before, a known user without feedback (version 0) was served by id,
    and model.recommend(id) read the store again: version 1's result came back as version 0
    (the "1 of 1,898 online results" of issue 18; reproduced by 8 recommend + 2 feedback
    threads on ML-100K)."""
    st = online.OnlineStore(model)
    monkeypatch.setattr(model, "_online_store", st, raising=False)
    user = "u5"
    want = model.recommend(model.user_state(user), k=5)  # version 0: the training state
    real_current = st.current
    fired = []

    def current(u):
        cur = real_current(u)
        if u == user and not fired:
            fired.append(1)
            st.feedback([(user, int(want.ids[0]), 1.0, 0.5)])  # published right after the read
        return cur

    monkeypatch.setattr(st, "current", current)
    recs, version = online.recommend(model, user, k=5)
    assert fired and version == 0
    np.testing.assert_array_equal(recs.ids, want.ids)
    np.testing.assert_array_equal(recs.scores, want.scores)
    recs1, version1 = online.recommend(model, user, k=5)  # the next call serves version 1
    assert version1 == 1 and int(want.ids[0]) not in recs1.ids.tolist()


def test_recommender_policy_learns_through_feedback(model):
    from recmeta_sdk.evaluation import bandits
    from recmeta_sdk.evaluation import sim

    env = sim.UserSimulator(n_items=30, dim=4, n_segments=2, n_test_segments=1, users_per_segment=4,
                            slate_size=2, drift=0.0, seed=1)
    made = []

    def factory(e):
        made.append(bandits.RecommenderPolicy(model, update="step"))
        return made[-1]

    res = sim.run_online(env, factory, T=4, seed=0)
    pol = made[0]
    assert pol.mode == "feedback" and np.isfinite(res.cumulative).all()
    log = pol._store.log()
    assert len(log) == len(env.users) * 4 * 2 and (log["propensity"] == 1.0).all()
    u = int(env.users[0])
    cur = pol._store.current(u)
    assert cur.version == 8 and len(set(cur.seen_ids)) == 8
    # the next slate is the model's greedy slate from the latest state
    exp = model.recommend(cur.state, k=2, exclude=cur.exclude_ids()).ids
    np.testing.assert_array_equal(pol.recommend(sim.UserContext(u, 4), 2, np.zeros(0, np.int64)), exp)
    assert online.store(model)._log == []  # the policy's own store, not the model's default one
    with pytest.raises(ValueError, match="adapt_steps"):
        bandits.RecommenderPolicy(model, adapt_steps=2)


def test_recommender_policy_never_serves_a_new_user_from_a_training_users_state():
    """An environment's user 0 is not the model's training user 0 (a replay or simulator
    numbers its users densely): by default the policy starts every user cold."""
    from recmeta_sdk.evaluation import bandits
    from recmeta_sdk.evaluation import sim

    log = _segments_log(n_users=30, seed=4)
    log["user"] = log["user"].str[1:].astype(int)  # training users 0..29
    m = rm.train(log, config={**TINY, "epochs": 2}, progress=False)
    pol = bandits.RecommenderPolicy(m, update="step")
    ctx = sim.UserContext(0, 0)
    cold = m.recommend(m.adapt([]), k=3).ids
    np.testing.assert_array_equal(pol.recommend(ctx, 3, np.zeros(0, np.int64)), cold)
    pol.feedback(0, 7, 1.0)
    cur = pol._store.current(0)
    assert not cur.known and cur.state.history_ids == (7,) and cur.version == 1
    np.testing.assert_allclose(cur.state.vector, m.adapt([7]).vector, rtol=1e-5, atol=1e-6)
    # the training user 0's own state is what known_users=True starts from
    warm = bandits.RecommenderPolicy(m, update="step", known_users=True)
    warm.feedback(0, 7, 1.0)
    wc = warm._store.current(0)
    assert wc.known and len(wc.state.history_ids) == 7 and wc.state.history_ids[-1] == 7
    with pytest.raises(TypeError, match="known_users"):
        online.OnlineStore(m, known_users=1)


def test_recommend_by_id_reads_the_online_state_and_excludes_misses():
    m = rm.train(_segments_log(), config=TINY, progress=False)  # its own default store
    before = m.recommend("u0", k=10)
    # a new user exists only through feedback: recommend by id serves its online state
    m.feedback([("n1", 11, 1.0, 0.1), ("n1", 12, 1.0, 0.1), ("n1", 25, 0.0, 0.1)])
    cur = online.current(m, "n1")
    by_id = m.recommend("n1", k=10)
    by_state = m.recommend(cur.state, k=10, exclude=[25])
    assert np.array_equal(by_id.ids, by_state.ids) and np.array_equal(by_id.scores, by_state.scores)
    assert not {11, 12, 25} & set(by_id.ids.tolist())  # clicks and the miss are all excluded
    # a known user's feedback changes what recommend(user_id) returns, in a batch too
    m.feedback([("u0", int(before.ids[0]), 0.0, 0.1)])
    after = m.recommend(["u0", "n1"], k=10)
    assert int(before.ids[0]) not in after.ids[0].tolist()
    assert np.array_equal(after.ids[1], by_id.ids)


def test_recommend_epsilon_matches_epsilon_slate(model):
    st = model.adapt([1, 2])
    a = model.recommend(st, k=5, explore="epsilon", epsilon=0.3, seed=11)
    b = online.epsilon_slate(model, st, 5, epsilon=0.3, seed=11)
    assert np.array_equal(a.ids, b.ids) and np.allclose(a.propensities, b.propensities)
    batch = model.recommend([st, st], k=5, explore="epsilon", epsilon=0.3, seed=11)
    assert batch.ids.shape == (2, 5) and np.array_equal(batch.ids[0], a.ids)
    assert (batch.propensities > 0).all() and (batch.propensities <= 1).all()
    with pytest.raises(ValueError, match="seed"):
        model.recommend(st, k=5, explore="epsilon")


def test_first_concurrent_feedback_calls_share_one_score_scale(model, monkeypatch):
    """The posterior's score unit is computed once per model, under a lock: 8 threads giving
    a model its first feedback at once all use one value (before, each computed its own, and a
    state built with a value later overwritten did not match a replay of the log)."""
    from recmeta_sdk.online import posterior

    monkeypatch.delitem(model.__dict__, "_feedback_score_scale", raising=False)
    calls = []
    real_adapt = model.adapt

    def slow_adapt(*a, **kw):
        calls.append(1)
        time.sleep(0.05)  # widen the window in which other threads see no value yet
        return real_adapt(*a, **kw)

    monkeypatch.setattr(model, "adapt", slow_adapt)
    barrier = threading.Barrier(8)
    out = []

    def run():
        barrier.wait()
        out.append(posterior.score_scale(model))

    threads = [threading.Thread(target=run) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(set(out)) == 1 and len(out) == 8
