"""The world model (recmeta_sdk.model.world): shapes, planted effects, session ends, files, inputs, seeds."""
from __future__ import annotations

import json
import struct

import numpy as np
import pandas as pd
import pytest
import torch

from recmeta_sdk.model.io import ModelFileError, write_model_file
from recmeta_sdk.model.world import WorldModel, WorldModelConfig

SMALL = {"dim": 8, "hidden": 16, "batch_users": 32, "lr": 0.03}
N_ITEMS = 40  # items 0..19: cluster "a", 20..39: cluster "b"


def _cluster_log(n_users: int, steps: int, seed: int, slate: int = 1, user0: int = 0) -> pd.DataFrame:
    """Users of segment 0 click cluster-a items (p 0.85) and rarely b (0.1); segment 1 the reverse.

    Uniformly random slates of ``slate`` items; position ``p`` has examination ``1 / (1 + p)``.
    """
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(user0, user0 + n_users):
        seg = u % 2
        for t in range(steps):
            items = rng.choice(N_ITEMS, size=slate, replace=False)
            for p, i in enumerate(items):
                like = (i < 20) == (seg == 0)
                click = rng.random() < (0.85 if like else 0.1) / (1.0 + p)
                rows.append((u, int(i), float(click), t, p, f"s{seg}", 1.0 / N_ITEMS))
    return pd.DataFrame(rows, columns=["user", "item", "reward", "timestamp", "position", "segment", "propensity"])


def _items() -> pd.DataFrame:
    return pd.DataFrame({"cluster": ["a" if i < 20 else "b" for i in range(N_ITEMS)]},
                        index=pd.Index(range(N_ITEMS), name="item"))


@pytest.fixture(scope="module")
def torch_one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def cluster_model(torch_one_thread):
    log = _cluster_log(160, 24, seed=1)
    return WorldModel.fit(log, item_features=_items(), epochs=25, seed=0, config=SMALL)


@pytest.fixture(scope="module")
def slate_model(torch_one_thread):
    log = _cluster_log(120, 12, seed=2, slate=3)
    return WorldModel.fit(log, item_features=_items(), epochs=10, seed=0, config=SMALL)


def _session_log(n_users: int, seed: int) -> pd.DataFrame:
    """Planted rule: a session ends right after a step without a click, and only then."""
    rng = np.random.default_rng(seed)
    rows, t = [], 0
    for u in range(n_users):
        for s in range(3):
            while True:
                click = float(rng.random() < 0.5)
                rows.append((u, int(rng.integers(N_ITEMS)), click, t, f"{u}-{s}"))
                t += 1
                if click == 0.0:
                    break
    return pd.DataFrame(rows, columns=["user", "item", "reward", "timestamp", "session"])


# ------------------------------------------------------------------ shapes and ranges

def test_shapes_and_ranges(cluster_model):
    wm = cluster_model
    assert wm.n_items == N_ITEMS and wm.n_positions == 1 and not wm.has_sessions
    h0 = wm.initial_state(3)
    assert h0.shape == (3, wm.hidden) and h0.dtype == np.float32
    assert np.array_equal(h0[0], h0[2])
    slate = np.array([[1], [25], [7]])
    p = wm.predict(h0, slate)
    assert p.shape == (3, 1) and ((p > 0) & (p < 1)).all()
    h1 = wm.step(h0, slate, [[1], [0], [1]])
    assert h1.shape == (3, wm.hidden) and np.isfinite(h1).all()
    assert not np.array_equal(h1[0], h1[1])
    one = wm.predict(h0[0], [3])
    assert one.shape == (1,)
    scores = wm.next_item_scores(h0)
    assert scores.shape == (3, N_ITEMS) and (scores < 0).all()
    # log P(next = i) sums to one over the catalogue; the joint with P(positive) is below it
    assert np.exp(scores).sum(1).max() < 1.0
    r = wm.sample_response(h0, slate, np.random.default_rng(0))
    assert r.shape == (3, 1) and set(np.unique(r)) <= {0.0, 1.0}
    assert wm.adapt([]).shape == (wm.hidden,)
    assert np.array_equal(wm.adapt([]), h0[0])
    assert 1 <= len(wm.history) <= 25 and len(wm.validation_history) == len(wm.history)
    assert wm.history[-1] < wm.history[0] and min(wm.validation_history) < wm.validation_history[0]


def test_slates_positions_and_position_bias(slate_model):
    wm = slate_model
    assert wm.n_positions == 3
    h = wm.initial_state(1)
    p = wm.predict(np.repeat(h, 3, 0), [[5, 5, 5]] * 3, positions=[[0, 1, 2]] * 3)
    # the planted examination 1 / (1 + p): the same item is clicked less further down
    assert p[0, 0] > p[0, 1] > p[0, 2]
    with pytest.raises(ValueError, match="positions"):
        wm.predict(h, [[1, 2, 3, 4]])
    assert wm.predict(h, [[1, 2, 3, 4]], positions=[[0, 1, 2, 2]]).shape == (1, 4)
    # (T, K) slate histories
    hs = wm.adapt(np.array([[1, 2, 3], [4, 5, 6]]), np.array([[1, 0, 0], [1, 1, 0]]))
    assert hs.shape == (wm.hidden,)


# ------------------------------------------------------------------ planted effects

def test_adaptation_separates_segments(cluster_model):
    """Adapted on 10 events, users of the two segments get opposite predictions; the prior cannot tell them apart."""
    wm = cluster_model
    new = _cluster_log(40, 10, seed=99, user0=1000)
    adapted, segs = [], []
    for u, g in new.groupby("user", sort=True):
        adapted.append(wm.adapt(g["item"].to_numpy(), g["reward"].to_numpy()))
        segs.append(u % 2)
    adapted, segs = np.stack(adapted), np.asarray(segs)
    probe = np.array([[3, 28]] * len(segs))  # an a item and a b item
    pa = wm.predict(adapted, probe, positions=np.zeros_like(probe))
    p0 = wm.predict(wm.initial_state(len(segs)), probe, positions=np.zeros_like(probe))
    # segment 0 prefers item 3 over 28, segment 1 the reverse, by a wide margin after adaptation
    gap0 = (pa[segs == 0, 0] - pa[segs == 0, 1]).mean()
    gap1 = (pa[segs == 1, 1] - pa[segs == 1, 0]).mean()
    assert gap0 > 0.3 and gap1 > 0.3, (gap0, gap1)
    # no adaptation: the same prediction for everyone
    assert np.abs(p0 - p0[0]).max() == 0.0


def test_evaluate_adaptation_beats_prior_and_popularity(cluster_model):
    wm = cluster_model
    held = _cluster_log(40, 24, seed=7, user0=2000)
    rep = wm.evaluate(held, support=10)
    assert rep["users"] == 40 and rep["events"] == 40 * 14 and rep["support"] == 10 and rep["online"]
    for name in ("world_model", "no_adaptation", "popularity"):
        m = rep[name]
        assert m["log_likelihood"] < 0 and 0 <= m["ece"] <= 1 and 0 <= m["hit@10"] <= 1
        assert sum(b["count"] for b in m["reliability"]) == rep["events"]
    wm_ll, na_ll, pop_ll = (rep[n]["log_likelihood"] for n in ("world_model", "no_adaptation", "popularity"))
    assert wm_ll > na_ll + 0.1 and wm_ll > pop_ll + 0.1, rep
    assert rep["world_model"]["hit@10"] > rep["popularity"]["hit@10"]
    frozen = wm.evaluate(held, support=10, online=False)
    assert frozen["events"] == rep["events"]
    assert frozen["world_model"]["log_likelihood"] > frozen["no_adaptation"]["log_likelihood"] + 0.1
    assert frozen["no_adaptation"] == rep["no_adaptation"]


def test_end_of_session_learns_planted_rule(torch_one_thread):
    wm = WorldModel.fit(_session_log(150, seed=3), epochs=30, seed=0, config=SMALL)
    assert wm.has_sessions
    h = wm.adapt([4, 9], [1.0, 0.0])
    p_no_click = wm.end_probability(h, [7], [0.0])
    p_click = wm.end_probability(h, [7], [1.0])
    assert p_no_click > 0.8 and p_click < 0.2, (p_no_click, p_click)
    hb = wm.initial_state(2)
    both = wm.end_probability(hb, [[1], [2]], [[0], [1]])
    assert both.shape == (2,) and both[0] > 0.8 and both[1] < 0.2
    rep = wm.evaluate(_session_log(30, seed=4), support=2)
    # popularity's end model is the training end rate (about one step in two ends a session)
    assert -0.75 < rep["popularity"]["end_log_likelihood"] < -0.6
    assert rep["world_model"]["end_log_likelihood"] > rep["popularity"]["end_log_likelihood"] + 0.4


def test_segment_priors(torch_one_thread):
    log = _cluster_log(80, 8, seed=5)
    wm = WorldModel.fit(log, item_features=_items(), segment_col="segment", epochs=20, seed=0, config=SMALL)
    assert sorted(wm.segments) == ["s0", "s1"]
    h = wm.initial_state(segments=["s0", "s1", None])
    assert h.shape == (3, wm.hidden)
    p = wm.predict(h[:2], [[3], [3]], positions=[[0], [0]])
    assert p[0, 0] > p[1, 0] + 0.2  # segment s0 likes cluster a from the prior alone
    with pytest.raises(ValueError, match="unknown segment"):
        wm.initial_state(segments=["s9"])
    with pytest.raises(ValueError, match="n=2 disagrees"):
        wm.initial_state(2, segments=["s0"])
    bad = log.copy()
    bad.loc[bad.index[1], "segment"] = "s1" if bad["segment"].iloc[1] == "s0" else "s0"
    with pytest.raises(ValueError, match="varies"):
        WorldModel.fit(bad, segment_col="segment", epochs=1, config=SMALL)


# ------------------------------------------------------------------ files

def test_save_load_round_trip_bit_identical(cluster_model, tmp_path):
    wm = cluster_model
    path = tmp_path / "wm.safetensors"
    wm.save(path)
    back = WorldModel.load(path)
    assert back.config == wm.config and back.item_map == wm.item_map and back.history == wm.history
    h = wm.adapt([1, 2, 30], [1, 0, 1])
    assert np.array_equal(back.adapt([1, 2, 30], [1, 0, 1]), h)
    slate = np.array([[0], [21]])
    hh = np.stack([h, h])
    assert np.array_equal(back.predict(hh, slate), wm.predict(hh, slate))
    assert np.array_equal(back.step(hh, slate, [[1], [0]]), wm.step(hh, slate, [[1], [0]]))
    assert np.array_equal(back.next_item_scores(hh), wm.next_item_scores(hh))
    held = _cluster_log(6, 14, seed=8, user0=3000)
    assert back.evaluate(held) == wm.evaluate(held)
    assert list(tmp_path.iterdir()) == [path]  # no temp file left behind


def test_corrupted_files_fail_at_load(cluster_model, tmp_path):
    path = tmp_path / "wm.safetensors"
    cluster_model.save(path)
    raw = path.read_bytes()
    flipped = bytearray(raw)
    flipped[-10] ^= 0xFF
    (tmp_path / "flip.safetensors").write_bytes(bytes(flipped))
    with pytest.raises(ModelFileError, match="SHA-256"):
        WorldModel.load(tmp_path / "flip.safetensors")
    for cut in (3, 50, len(raw) // 2, len(raw) - 1):
        (tmp_path / "cut.safetensors").write_bytes(raw[:cut])
        with pytest.raises(ModelFileError):
            WorldModel.load(tmp_path / "cut.safetensors")
    with pytest.raises(FileNotFoundError):
        WorldModel.load(tmp_path / "missing.safetensors")
    # valid digests but inconsistent contents: a recommender-like file, a wrong shape, a wrong version
    hlen = struct.unpack("<Q", raw[:8])[0]
    meta = json.loads(json.loads(raw[8:8 + hlen])["__metadata__"]["recmeta"])
    from recmeta_sdk.model.io import read_model_file

    tensors, _ = read_model_file(path)
    base = {k: v for k, v in meta.items() if k not in ("format", "format_version", "sha256", "library_version",
                                                         "torch_version")}
    cases = {
        "kind": (dict(base, kind="something-else"), tensors, "not a world-model file"),
        "version": (dict(base, world_model_version=99), tensors, "world_model_version"),
        "shape": (base, dict(tensors, **{"net.item_bias": torch.zeros(N_ITEMS + 1)}), "shape"),
        "missing": (base, {k: v for k, v in tensors.items() if k != "net.pos_bias"}, "missing"),
        "nan": (base, dict(tensors, **{"net.prior": torch.full_like(tensors["net.prior"], float("nan"))}),
                "non-finite"),
        "config": (dict(base, config=dict(base["config"], hidden=-3)), tensors, "hidden"),
    }
    for name, (m, t, msg) in cases.items():
        p = tmp_path / f"{name}.safetensors"
        write_model_file(p, t, m)
        with pytest.raises(ModelFileError, match=msg):
            WorldModel.load(p)


# ------------------------------------------------------------------ input validation

def test_input_validation(cluster_model):
    wm = cluster_model
    h = wm.initial_state(1)
    with pytest.raises(ValueError, match="unknown item ids \\[999\\]"):
        wm.predict(h, [[999]])
    with pytest.raises(ValueError, match="state must have shape"):
        wm.predict(np.zeros((1, wm.hidden + 1)), [[1]])
    with pytest.raises(ValueError, match="non-finite"):
        wm.predict(np.full((1, wm.hidden), np.nan), [[1]])
    with pytest.raises(ValueError, match="rows"):
        wm.predict(np.zeros((2, wm.hidden)), [[1]])
    with pytest.raises(ValueError, match="response has shape"):
        wm.step(h, [[1]], [[1, 0]])
    with pytest.raises(ValueError, match="0/1 values"):
        wm.step(h, [[1]], [[np.nan]])
    with pytest.raises(ValueError, match="0/1 values.*adapt"):
        wm.step(h, [[1]], [[4.0]])
    with pytest.raises(ValueError, match="without session"):
        wm.end_probability(h, [[1]], [[1]])
    with pytest.raises(TypeError, match="Generator"):
        wm.sample_response(h, [[1]], 0)
    with pytest.raises(ValueError, match="position -1"):
        wm.predict(h, [[1]], positions=[[-1]])
    with pytest.raises(ValueError, match="history_rewards has shape"):
        wm.adapt([1, 2], [1])
    with pytest.raises(ValueError, match="unknown item"):
        wm.adapt([1, 12345])
    with pytest.raises(ValueError, match="n must be a positive integer"):
        wm.initial_state(0)
    held = _cluster_log(3, 12, seed=9, user0=500)
    held.loc[held.index[-1], "item"] = 4242
    with pytest.raises(ValueError, match="4242"):
        wm.evaluate(held)
    rep = wm.evaluate(held, unknown_items="drop")
    assert rep["dropped_events"] == 1
    with pytest.raises(ValueError, match="nothing to score"):
        wm.evaluate(held, support=100, unknown_items="drop")


@pytest.mark.parametrize("mutate, exc, msg", [
    (lambda d: d.assign(reward=d["reward"].where(d.index != 3, np.nan)), ValueError, "'reward'.*row 3"),
    (lambda d: d.assign(reward=d["reward"].where(d.index != 5, np.inf)), ValueError, "'reward'.*row 5"),
    (lambda d: d.assign(position=d["position"].where(d.index != 2, -1)), ValueError, "'position'.*-1"),
    (lambda d: d.assign(position=d["position"] + 0.5), ValueError, "'position'"),
    (lambda d: d.assign(propensity=0.0), ValueError, "'propensity'.*\\(0, 1\\]"),
    (lambda d: d.assign(reward="yes"), TypeError, "'reward' must be numeric"),
    (lambda d: d.drop(columns="item"), ValueError, "item column 'item' not in"),
    (lambda d: d.iloc[:0], ValueError, "empty"),
    (lambda d: d.assign(user=d["user"].where(d.index != 4, None)), ValueError, "'user' has a missing value"),
])
def test_fit_rejects_bad_logs(mutate, exc, msg):
    log = _cluster_log(4, 3, seed=0)
    with pytest.raises(exc, match=msg):
        WorldModel.fit(mutate(log), epochs=1, config=SMALL)


def test_fit_rejects_bad_arguments():
    log = _cluster_log(4, 3, seed=0)
    with pytest.raises(TypeError, match="DataFrame"):
        WorldModel.fit(log.to_dict("list"), epochs=1)
    with pytest.raises(ValueError, match="session column 'sess' not in"):
        WorldModel.fit(log, session_col="sess", epochs=1)
    with pytest.raises(ValueError, match="epochs"):
        WorldModel.fit(log, epochs=-1)
    with pytest.raises(ValueError, match="unknown WorldModelConfig"):
        WorldModel.fit(log, epochs=1, config={"hiden": 3})
    with pytest.raises(ValueError, match="lr"):
        WorldModel.fit(log, epochs=1, config={"lr": float("nan")})
    with pytest.raises(TypeError, match="item_features"):
        WorldModel.fit(log, item_features=[1, 2], epochs=1)
    bad_items = _items().assign(score=np.r_[np.inf, np.zeros(N_ITEMS - 1)])
    with pytest.raises(ValueError, match="'score' is infinite"):
        WorldModel.fit(log, item_features=bad_items, epochs=1)
    dup = log.copy()
    dup.loc[dup.index[1], ["timestamp", "position"]] = [dup["timestamp"].iloc[0], dup["position"].iloc[0]]
    dup.loc[dup.index[1], "user"] = dup["user"].iloc[0]
    with pytest.raises(ValueError, match="two rows at position"):
        WorldModel.fit(dup, epochs=1)
    sess = _session_log(2, seed=0)
    sess.loc[sess.index[-1], "session"] = sess["session"].iloc[0]
    sess.loc[sess.index[-1], "user"] = sess["user"].iloc[0]
    with pytest.raises(ValueError, match="not contiguous"):
        WorldModel.fit(sess, epochs=1)


# ------------------------------------------------------------------ determinism

def test_same_seed_same_model_other_seed_other_model(torch_one_thread):
    log = _cluster_log(30, 6, seed=11)
    cfg = WorldModelConfig(dim=4, hidden=8, batch_users=8)
    a = WorldModel.fit(log, item_features=_items(), epochs=3, seed=5, config=cfg)
    b = WorldModel.fit(log, item_features=_items(), epochs=3, seed=5, config=cfg)
    c = WorldModel.fit(log, item_features=_items(), epochs=3, seed=6, config=cfg)
    h = a.adapt([1, 2, 3], [1, 0, 1])
    assert a.history == b.history and a.validation_history == b.validation_history
    assert np.array_equal(h, b.adapt([1, 2, 3], [1, 0, 1]))
    assert np.array_equal(a.predict(h, [1]), b.predict(h, [1]))
    assert not np.array_equal(h, c.adapt([1, 2, 3], [1, 0, 1]))
    assert cfg.seed == 0 and cfg.epochs == 20  # the caller's config is not modified


def test_config_epochs_and_validation_split(torch_one_thread):
    log = _cluster_log(30, 4, seed=12)
    wm = WorldModel.fit(log, config={"dim": 4, "hidden": 8, "epochs": 2, "validation": 0.0})
    assert len(wm.history) == 2 and wm.validation_history == []
    assert wm.config.epochs == 2 and wm.config.seed == 0
    # without validation users there is no calibration: the response logits are left as trained
    assert wm._net.calib.tolist() == [1.0, 0.0]
