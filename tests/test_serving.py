"""The serving fast path of ``Recommender`` (``adapt``, ``user_state``, ``recommend``) against
the general computation it replaces: the network's own towers over the whole item table, the
wide part from ``RecMetaNet.wide_offset`` and ``ops.policy_topk`` / ``ops.policy_sample`` on
torch tensors, one user per call. The fast path must give the same ids, scores, valid flags
and propensities bit for bit (same kernels, same inputs, same order of operations)."""
import dataclasses
import threading

import numpy as np
import pandas as pd
import pytest
import torch

import recmeta_sdk as rm
from recmeta_sdk import ops
from recmeta_sdk.training.loop import history_tensors

TINY = {"dim": 16, "hidden": 32, "seq_len": 5, "layers": 1, "heads": 2, "epochs": 2, "batch_size": 64,
        "lr": 0.01, "inner_steps": 1}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _log(n_users=70, n_items=43, seed=0, str_ids=False):
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        n = int(rng.integers(4, 14))
        for t, i in enumerate(rng.choice(n_items, size=n, replace=False)):
            item = f"i{i}" if str_ids else int(i) * 3 + 1  # sparse, sorted integer ids
            rows.append((u, item, t, float(rng.integers(1, 6))))
    return pd.DataFrame(rows, columns=["user", "item", "timestamp", "reward"])


@pytest.fixture(scope="module")
def models():
    """A model with the wide part (default), one without, and one with string item ids."""
    log = _log()
    wide = rm.train(log, config=TINY, progress=False)
    deep = rm.train(log, config=dict(TINY, wide="none"), progress=False)
    strs = rm.train(_log(str_ids=True, seed=1), config=TINY, progress=False)
    assert wide._net.has_wide and not deep._net.has_wide
    return {"wide": wide, "deep": deep, "str": strs}


@pytest.fixture(scope="module")
def featured():
    """A model with user and item side features (real MovieLens slice)."""
    try:
        ds = rm.datasets.load("ml-100k")
    except Exception as e:  # noqa: BLE001 - no network and no cache: whatever the loader raises
        pytest.skip(f"ml-100k unavailable: {e}")
    log = ds.interactions[ds.interactions["user"] <= 60].reset_index(drop=True)
    return rm.train(log, users=ds.users, items=ds.items, config=dict(TINY, epochs=1), progress=False)


# ----------------------------------------------------------------------------- general path
def _general_states(model, hists, rewards, ufeats, steps, new=False):
    """(h, h', wide) by the network over the whole item table (the pre-fast-path computation);
    ``new``: the histories are new users' (``adapt``: the new users' wide weight)."""
    net = model._net
    bi, bo, bw, sq, sl = history_tensors(hists, model.config.seq_len, model.n_items)
    uo = np.concatenate([[0], np.cumsum([len(u) for u in ufeats])]).astype(np.int64)
    ui = np.concatenate(ufeats).astype(np.int64) if uo[-1] else np.zeros(0, np.int64)
    with torch.no_grad():
        h = net.user_state(model._X, bi, bo, bw, sq, sl, torch.from_numpy(ui), torch.from_numpy(uo))
        B = h.shape[0]
        rows = torch.from_numpy(np.repeat(np.arange(B), [len(x) for x in hists]))
        w = torch.from_numpy(np.maximum(np.concatenate(rewards), 0.0).astype(np.float32)) / model._reward_scale
        lr = None if model.config.meta == "fomaml" else model.config.inner_lr
        offset = net.wide_offset(rows, bi, B, new=new)
        gamma, delta = net.adapt_phi(h, model._V, rows, bi, w, steps, lr=lr, offset=offset)
        hp = net.apply_phi(h, gamma, delta)
    return h, hp, offset


def _general_wide(model, history, new=True):
    if not model._net.has_wide:
        return None
    items = torch.from_numpy(np.asarray(history, np.int64))
    with torch.no_grad():
        return model._net.wide_offset(torch.zeros(len(items), dtype=torch.int64), items, 1, new=new)[0]


def _general_recommend(model, state, k, *, exclude_seen=True, exclude=(), candidates=None, tau=None,
                       popularity_penalty=0.0, seed=None):
    """One user by ops.policy_topk / policy_sample on torch tensors (the pre-fast-path serving)."""
    tau = model.config.temperature if tau is None else tau
    bias = model._bias
    if popularity_penalty > 0:
        bias = bias - float(popularity_penalty) * float(tau) * model._log_pop
    wide = _general_wide(model, state.history, new=state.user is None)
    if wide is not None:
        bias = (bias + wide).contiguous()
    exc = np.unique(np.concatenate([np.asarray(state.history, np.int64) if exclude_seen else np.zeros(0, np.int64),
                                    model.item_map.to_index(np.asarray(exclude)).astype(np.int64)
                                    if len(exclude) else np.zeros(0, np.int64)]))
    ex = (torch.tensor([0, len(exc)]), torch.from_numpy(exc)) if len(exc) else None
    ca = None
    if candidates is not None:
        ci = model.item_map.to_index(np.asarray(candidates)).astype(np.int64)
        ca = (torch.tensor([0, len(ci)]), torch.from_numpy(ci))
    u = torch.from_numpy(np.asarray(state.vector, np.float32)[None].copy())
    if seed is None:
        ids, sc, _ = ops.policy_topk(u, model._V, k, bias=bias, exclude=ex, candidates=ca, temperature=tau)
        pr = None
    else:
        ids, sc, pr, _ = ops.policy_sample(u, model._V, k, seed=seed, bias=bias, exclude=ex, candidates=ca,
                                           temperature=tau)
        pr = pr[0].numpy()
    return ids[0].numpy(), sc[0].numpy(), pr


def _ext(model, ids):
    valid = ids >= 0
    if np.issubdtype(model.item_ids.dtype, np.integer):
        return np.where(valid, model.item_ids[np.maximum(ids, 0)], -1), valid
    out = np.empty(ids.shape, dtype=object)
    out[valid] = model.item_ids[ids[valid]]
    return out, valid


def _assert_same(model, rec, general, k):
    ids, sc, pr = general
    ext, valid = _ext(model, ids)
    assert rec.ids.shape == (k,)
    np.testing.assert_array_equal(rec.valid, valid)
    assert list(rec.ids[valid]) == list(ext[valid])
    np.testing.assert_array_equal(rec.scores, sc)  # bit-identical (-inf in padding too)
    if pr is None:
        assert rec.propensities is None
    else:
        np.testing.assert_array_equal(rec.propensities, pr)


def _histories(model, rng, n=12):
    out = []
    for j in range(n):
        m = int(rng.integers(1, 3 * model.config.seq_len))
        out.append(list(rng.choice(model.item_ids, m, replace=j % 3 == 0)))  # some with repeats
    return out


# ----------------------------------------------------------------------------- states
@pytest.mark.parametrize("kind", ["wide", "deep", "str"])
def test_adapt_states_equal_the_network_over_the_whole_table(models, kind):
    model = models[kind]
    rng = np.random.default_rng(11)
    for hist in _histories(model, rng) + [[]]:
        for steps in (0, 1, 3):
            st = model.adapt(hist, steps=steps)
            idx = model.item_map.to_index(np.asarray(hist)).astype(np.int64) if hist else np.zeros(0, np.int64)
            np.testing.assert_array_equal(st.history, idx)
            h, hp, wide = _general_states(model, [idx], [st.rewards], [np.zeros(0, np.int64)], steps, new=True)
            np.testing.assert_array_equal(st.base, h[0].numpy())
            np.testing.assert_array_equal(st.vector, hp[0].numpy())
            if wide is None:
                assert model._state_wide(st) is None
            else:
                np.testing.assert_array_equal(st._serving[2], wide[0].numpy())
            assert st.history_ids == tuple(hist) and all(type(x) in (int, str) for x in st.history_ids)


def test_batched_known_user_states_equal_the_network(models, featured):
    for model in (models["wide"], featured):
        users = list(model.user_ids[:9])
        sts = model._user_states(users, None)
        us = model.user_map.to_index(users)
        hists = [model._hist_items[model._hist_offsets[u]:model._hist_offsets[u + 1]] for u in us]
        rews = [model._hist_rewards[model._hist_offsets[u]:model._hist_offsets[u + 1]] for u in us]
        ufs = [model._uf_idx[model._uf_off[u]:model._uf_off[u + 1]] if len(model._uf_off) > u + 1
               else np.zeros(0, np.int64) for u in us]
        h, hp, wide = _general_states(model, hists, rews, ufs, model.config.inner_steps)
        for b, st in enumerate(sts):
            np.testing.assert_array_equal(st.base, h[b].numpy())
            np.testing.assert_array_equal(st.vector, hp[b].numpy())
            np.testing.assert_array_equal(st._serving[2], wide[b].numpy())
        # one at a time (the network's batched matmuls may differ from single rows in the last
        # bit, so each is compared with the network on that user alone)
        for b, u in enumerate(users[:3]):
            _, hp1, wide1 = _general_states(model, hists[b:b + 1], rews[b:b + 1], ufs[b:b + 1],
                                            model.config.inner_steps)
            one = model.user_state(u)
            np.testing.assert_array_equal(one.vector, hp1[0].numpy())
            np.testing.assert_array_equal(one._serving[2], wide1[0].numpy())
            np.testing.assert_allclose(one.vector, sts[b].vector, rtol=1e-5, atol=1e-6)


def test_adapt_with_user_features_equals_the_network(featured):
    model = featured
    feats = {"age": 31, "gender": "F", "occupation": "writer", "zip_code": "94043"}
    assert model._user_schema and len(model._encode_user_features(feats))
    for hist in ([50, 172, 181], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], []):
        st = model.adapt(hist, features=feats)
        uf = model._encode_user_features(feats)
        idx = model.item_map.to_index(np.asarray(hist)).astype(np.int64) if hist else np.zeros(0, np.int64)
        _, hp, _ = _general_states(model, [idx], [st.rewards], [uf], model.config.inner_steps, new=True)
        np.testing.assert_array_equal(st.vector, hp[0].numpy())


def test_item_positions_match_pandas(models):
    rng = np.random.default_rng(5)
    for model in models.values():
        ids = model.item_ids
        if np.issubdtype(ids.dtype, np.integer):
            assert model._table().sorted_int_ids is not None
            q = np.concatenate([rng.choice(ids, 30), rng.integers(-5, int(ids.max()) + 5, 60),
                                [ids.min() - 1, ids.max() + 1, np.iinfo(np.int64).max]]).astype(ids.dtype)
            for arr in (q, q.astype(np.int32), q.astype(np.float64), q.astype(object)):
                np.testing.assert_array_equal(model._item_positions(arr), pd.Index(model.item_ids).get_indexer(arr))
        else:
            assert model._table().sorted_int_ids is None
            q = np.concatenate([rng.choice(ids, 20), np.array(["nope", "i999"], dtype=object)])
            np.testing.assert_array_equal(model._item_positions(q), pd.Index(model.item_ids).get_indexer(q))
    # an unsorted integer catalogue is not searched by bisection
    from recmeta_sdk.api import _ServingTable

    m = models["wide"]
    assert _ServingTable(m._V, m._bias, np.array([5, 1, 9]), m._net).sorted_int_ids is None


# ----------------------------------------------------------------------------- recommend
@pytest.mark.parametrize("kind", ["wide", "deep", "str"])
def test_recommend_equals_the_general_path(models, kind):
    model = models[kind]
    rng = np.random.default_rng(7)
    for j, hist in enumerate(_histories(model, rng)):
        st = model.adapt(hist)
        k = int(rng.integers(1, 12))
        ex = list(rng.choice(model.item_ids, 4))
        cand = list(rng.choice(model.item_ids, 15))
        cases = [({}, {}), ({"exclude_seen": False}, {"exclude_seen": False}),
                 ({"exclude": ex}, {"exclude": ex}), ({"candidates": cand}, {"candidates": cand}),
                 ({"candidates": cand, "exclude": ex}, {"candidates": cand, "exclude": ex}),
                 ({"candidates": []}, {"candidates": []}),
                 ({"temperature": 0.37}, {"tau": 0.37}),
                 ({"popularity_penalty": 1.3}, {"popularity_penalty": 1.3}),
                 ({"explore": "sample", "seed": 40 + j}, {"seed": 40 + j}),
                 ({"explore": "sample", "seed": 3, "candidates": cand}, {"seed": 3, "candidates": cand})]
        for kw, gkw in cases:
            rec = model.recommend(st, k, **kw)
            _assert_same(model, rec, _general_recommend(model, st, k, **gkw), k)
        # k larger than the eligible items: padding; k above the catalogue is capped at
        # n_items columns (the ops' rule: no result larger than the catalogue)
        big = model.recommend(st, model.n_items + 3)
        _assert_same(model, big, _general_recommend(model, st, model.n_items + 3), model.n_items)
        assert (~big.valid).sum() == len(set(st.history.tolist()))


def test_batch_mixed_users_and_states_equal_single_calls(models):
    model = models["wide"]
    rng = np.random.default_rng(3)
    states = [model.adapt(h) for h in _histories(model, rng, 4)]
    users = [int(u) for u in model.user_ids[:3]]
    batch = states[:2] + users + states[2:]
    # the known users of a batch are served from their own states (each computed alone, once),
    # so a batch equals single calls bit for bit
    joint = {}
    for kw in ({}, {"exclude": list(model.item_ids[:5])}, {"popularity_penalty": 0.5}):
        rec = model.recommend(batch, 6, **kw)
        assert rec.ids.shape == (len(batch), 6)
        for b, x in enumerate(batch):
            one = model.recommend(joint.get(x, x) if not isinstance(x, rm.UserState) else x, 6, **kw)
            np.testing.assert_array_equal(rec.ids[b], one.ids)
            np.testing.assert_array_equal(rec.scores[b], one.scores)
            np.testing.assert_array_equal(rec.valid[b], one.valid)
    # sampling: user b of a batch draws with seed + b, as a single call with that seed
    rec = model.recommend(batch, 5, explore="sample", seed=9)
    for b, x in enumerate(batch):
        one = model.recommend(joint.get(x, x) if not isinstance(x, rm.UserState) else x, 5, explore="sample",
                              seed=9 + b)
        np.testing.assert_array_equal(rec.ids[b], one.ids)
        np.testing.assert_array_equal(rec.propensities[b], one.propensities)
    again = model.recommend(batch, 5, explore="sample", seed=9)
    np.testing.assert_array_equal(again.ids, rec.ids)
    np.testing.assert_array_equal(again.propensities, rec.propensities)
    # known users: the general path on their training state
    for u in users:
        st = model.user_state(u)
        _assert_same(model, model.recommend(u, 7), _general_recommend(model, st, 7), 7)


def test_scores_are_the_policy_and_the_top_k_is_tie_aware(models):
    """Independently of the kernel: the returned scores are (<h', v> + b + wide) / tau of the
    returned items (float tolerance), and no eligible item outside the slate scores higher."""
    model = models["wide"]
    rng = np.random.default_rng(2)
    for hist in _histories(model, rng, 6):
        st = model.adapt(hist)
        rec = model.recommend(st, 8, temperature=0.8)
        idx = model.item_map.to_index(rec.ids)
        full = (st.vector.astype(np.float64) @ model._V.numpy().T.astype(np.float64) + model._bias.numpy()
                + _general_wide(model, st.history).numpy()) / 0.8
        np.testing.assert_allclose(rec.scores, full[idx], rtol=1e-5, atol=1e-5)
        eligible = np.setdiff1d(np.arange(model.n_items), np.concatenate([st.history, idx]))
        assert full[eligible].max() <= rec.scores.min() + 1e-5


def test_diversity_and_explain_equal_the_general_pool(models):
    model = models["wide"]
    st = model.adapt(list(model.item_ids[[1, 4, 9, 16]]))
    k = 5
    pool = min(model.n_items, max(5 * k, 50))
    pids, psc, _ = _general_recommend(model, st, pool)
    gi, gs = model._mmr(torch.from_numpy(pids[None]), torch.from_numpy(psc[None]), k, 0.6)
    rec = model.recommend(st, k, diversity=0.6)
    np.testing.assert_array_equal(model.item_map.to_index(rec.ids), gi[0].numpy())
    np.testing.assert_array_equal(rec.scores, gs[0].numpy())
    ex = model.recommend(st, 3, explain=True)
    plain = model.recommend(st, 3)
    np.testing.assert_array_equal(ex.ids, plain.ids)
    assert [e["item"] for e in ex.explanations] == list(plain.ids)
    hist_ids = set(st.history_ids)
    for e in ex.explanations:
        assert {h for h, _ in e["history"]} <= hist_ids


def test_wide_cache_belongs_to_the_model_and_the_history(models):
    wide = models["wide"]
    hist = list(wide.item_ids[[0, 2, 5]])
    st = wide.adapt(hist)
    assert st._serving[0] is wide._table().token and st._serving[1] is st.history
    # a state whose history was replaced: its wide part is recomputed from the new history
    other = np.asarray(wide.item_map.to_index(wide.item_ids[[7, 8]]), np.int64)
    moved = dataclasses.replace(st, history=other)
    np.testing.assert_array_equal(wide._state_wide(moved), _general_wide(wide, other).numpy())
    _assert_same(wide, wide.recommend(moved, 6), _general_recommend(wide, moved, 6), 6)
    # a state made by another model (same catalogue and dim): served with that model's wide part
    twin = rm.train(_log(), config=dict(TINY, seed=5, wide_reg=3.0), progress=False)
    assert not np.array_equal(twin._state_wide(dataclasses.replace(st)), st._serving[2])
    _assert_same(twin, twin.recommend(st, 6), _general_recommend(twin, st, 6), 6)
    # a state built by hand (no cache) and a copy without the cache give the same slate
    bare = rm.UserState(st.vector.copy(), st.base.copy(), st.history.copy(), st.history_ids, st.rewards)
    assert bare._serving is None
    _assert_same(wide, wide.recommend(bare, 6), _general_recommend(wide, st, 6), 6)
    assert bare._serving is not None  # filled on first use
    # the cache does not take part in equality or repr
    assert "_serving" not in repr(st)


def test_resume_and_load_serve_their_own_weights(models, tmp_path):
    model = models["wide"]
    path = tmp_path / "m.recmeta"
    model.save(path)
    loaded = rm.load(path)
    assert loaded._table() is not model._table()
    st = model.adapt(list(model.item_ids[[3, 6]]))
    a, b = model.recommend(st, 9), loaded.recommend(st, 9)
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_array_equal(a.scores, b.scores)
    # a resumed model has new weights: its own table, and the general path on them
    events = pd.DataFrame([{"user": int(u), "item": int(model.item_ids[i]), "reward": 1.0, "propensity": 0.1,
                            "timestamp": 1e9 + t, "position": 0}
                           for t, (u, i) in enumerate([(0, 1), (0, 2), (1, 5), (1, 7), (2, 9), (2, 1)])])
    new = rm.train(events, resume=model, config={"epochs": 1})
    assert not torch.equal(new._V, model._V)
    np.testing.assert_array_equal(new._table().V, new._V.numpy())
    _assert_same(new, new.recommend(st, 9), _general_recommend(new, st, 9), 9)


def test_copied_and_pickled_models_serve_the_same(models):
    import copy
    import pickle

    model = models["str"]  # (no online store, which holds locks)
    st = model.adapt(list(model.item_ids[[2, 5, 8]]))
    ref = model.recommend(st, 8)
    for other in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert other._table().token is not model._table().token
        rec = other.recommend(st, 8)  # the state's cache belongs to `model`: recomputed
        np.testing.assert_array_equal(rec.ids, ref.ids)
        np.testing.assert_array_equal(rec.scores, ref.scores)
        np.testing.assert_array_equal(other.recommend(other.adapt(list(st.history_ids)), 8).scores, ref.scores)
    # a pickled state (numpy arrays come back with non-canonical dtype objects)
    back = pickle.loads(pickle.dumps(st))
    for kw in ({}, {"exclude": list(model.item_ids[:3]), "candidates": list(model.item_ids[:20])},
               {"explore": "sample", "seed": 2}):
        a, b = model.recommend(back, 8, **kw), model.recommend(st, 8, **kw)
        np.testing.assert_array_equal(a.ids, b.ids)
        np.testing.assert_array_equal(a.scores, b.scores)


def test_torch_backend_fallback_agrees(models, monkeypatch):
    model = models["wide"]
    st = model.adapt(list(model.item_ids[[2, 3, 11]]))
    cpp = model.recommend(st, 10)
    cpp_s = model.recommend(st, 10, explore="sample", seed=1)
    monkeypatch.setenv("RECMETA_BACKEND", "torch")
    ref = model.recommend(st, 10)
    np.testing.assert_allclose(ref.scores, cpp.scores, rtol=1e-5, atol=1e-5)
    # tie-aware: the same set of items above the last score's tolerance band
    last = cpp.scores[-1] + 1e-5
    assert set(ref.ids[ref.scores > last].tolist()) == set(cpp.ids[cpp.scores > last].tolist())
    ref_s = model.recommend(st, 10, explore="sample", seed=1)
    np.testing.assert_allclose(ref_s.propensities, cpp_s.propensities, rtol=1e-4)
    assert ref_s.ids.tolist() == cpp_s.ids.tolist()


def test_serving_errors_are_named(models):
    model = models["wide"]
    st = model.adapt(list(model.item_ids[[2, 3]]))
    bad = dataclasses.replace(st, vector=np.full(model.dim, np.nan, np.float32))
    with pytest.raises(ValueError, match="user_states: non-finite"):
        model.recommend(bad)
    with pytest.raises(ValueError, match=r"UserState vector has shape \(3,\)"):
        model.recommend(dataclasses.replace(st, vector=np.zeros(3, np.float32)))
    with pytest.raises(ValueError, match="candidates has item ids unknown"):
        model.recommend(st, candidates=[-77])
    with pytest.raises(ValueError, match="k must be a positive int"):
        model.recommend(st, k=0)
    with pytest.raises(ValueError, match="unknown user 'nobody'"):
        model.recommend(["nobody"])
    with pytest.raises(ValueError, match=r"unknown to the model: \[-3\]"):
        model.adapt([int(model.item_ids[0]), -3])
    # a hand-made state whose history holds an out-of-range index: named, not an IndexError
    broken = dataclasses.replace(st, history=np.array([1, model.n_items + 4], np.int64))
    with pytest.raises(ValueError, match=str(model.n_items + 4)):
        model.recommend(broken)
    with pytest.raises(ValueError, match=str(model.n_items + 4)):
        model._states([broken.history], [np.ones(2, np.float32)], [np.zeros(0, np.int64)], 1)


def test_concurrent_serving_from_shared_states_is_consistent(models):
    model = models["wide"]
    rng = np.random.default_rng(8)
    hists = _histories(model, rng, 6)
    expected = [model.recommend(model.adapt(h), 7) for h in hists]
    shared = [rm.UserState(s.vector, s.base, s.history, s.history_ids, s.rewards)
              for s in (model.adapt(h) for h in hists)]  # no cache: threads race to fill it
    errors = []

    def work(t):
        for r in range(10):
            for j in ((t + r) % 6, (t * 5 + r) % 6):
                rec = model.recommend(shared[j], 7)
                if not (np.array_equal(rec.ids, expected[j].ids) and np.array_equal(rec.scores, expected[j].scores)):
                    errors.append((t, j))
            st = model.adapt(hists[t % 6])
            if not np.array_equal(model.recommend(st, 7).ids, expected[t % 6].ids):
                errors.append((t, "adapt"))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors


# ---------------------------------------------------------------------------- known-user state cache

def test_known_user_states_are_computed_once_and_equal_a_fresh_computation(models):
    m = models["wide"]
    users = list(m.user_ids[:6])
    fresh = [m._compute_user_states([u], [m._known(u)], None, None)[0] for u in users]
    m._known_states.clear()
    first = m._served_states(users)
    again = m._served_states(list(reversed(users)))[::-1]
    for u, f, a, b in zip(users, fresh, first, again):
        assert a is b and m.user_state(u) is a  # served from the cache, not recomputed
        np.testing.assert_array_equal(a.vector, f.vector)  # each computed alone: bit for bit
        np.testing.assert_array_equal(a.base, f.base)
        np.testing.assert_array_equal(a.history, f.history)
        np.testing.assert_array_equal(a._serving[2], f._serving[2])
        with pytest.raises(ValueError):  # shared: read-only
            a.vector[0] = 0.0
    # a batch of known users equals the fresh single states' recommendations
    rec = m.recommend(users, k=7)
    ref = m.recommend(fresh, k=7)
    np.testing.assert_array_equal(rec.ids, ref.ids)
    np.testing.assert_array_equal(rec.scores, ref.scores)


def test_known_user_state_cache_is_bounded_and_bypassed_for_other_steps(models, monkeypatch):
    m = models["wide"]
    monkeypatch.setattr(m, "_known_capacity", 3)
    m._known_states.clear()
    users = list(m.user_ids[:8])
    for u in users:
        m.recommend(u, k=5)
    assert list(m._known_states) == [m._known(u) for u in users[-3:]]  # least recently used out
    m.recommend(users[-3], k=5)  # a hit moves to the end
    assert list(m._known_states)[-1] == m._known(users[-3])
    before = dict(m._known_states)
    st = m.user_state(users[0], steps=0)  # explicit steps: computed, not cached
    assert st.steps == 0 and dict(m._known_states) == before
    m._known_states.clear()
