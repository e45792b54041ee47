"""Rewards mean what users mean: reward-0 rows are impressions, never supervised targets;
star ratings get a positive threshold; ignored reward-like columns, duplicate rows and mixed
id types are never silent."""
import logging
import warnings

import numpy as np
import pandas as pd
import pytest

import recmeta_sdk as rm
from recmeta_sdk.training.loop import positive_threshold

SMALL = {"dim": 16, "hidden": 32, "encoder": "none", "epochs": 12, "batch_size": 32, "wide": "none",
         "seed": 0}


def impression_log(seed=0, n_users=120):
    """A logging policy that mostly shows items 0-9 (never clicked) and sometimes items
    10-19 (clicked when shown): imitating the log ranks 0-9 first, learning from the
    rewards ranks 10-19 first."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        t = 0
        shown_bad = rng.choice(10, 8, replace=False)
        shown_good = 10 + rng.choice(10, 3, replace=False)
        for i in shown_bad:
            rows.append((u, int(i), t, 0.0)); t += 1
        for i in shown_good:
            rows.append((u, int(i), t, 1.0)); t += 1
    df = pd.DataFrame(rows, columns=["user", "item", "timestamp", "reward"])
    return df.sample(frac=1.0, random_state=seed).reset_index(drop=True)


def test_impressions_are_not_targets():
    log = impression_log()
    model = rm.train(log, config=SMALL)
    users = np.arange(0, 120, 7)
    recs = model.recommend(list(users), k=3)
    good = np.isin(recs.ids, np.arange(10, 20))
    # reward-driven: the clicked kind first (imitation of the log puts 0-9 first)
    assert good.mean() >= 0.9, recs.ids
    # a new user with no history: the clicked kind too
    cold = model.recommend(model.adapt([]), k=5)
    assert np.isin(cold.ids, np.arange(10, 20)).mean() >= 0.8, cold.ids


def test_imitation_would_rank_impressions_first():
    """The same log with every row a target (the behaviour this module guards against):
    the logged-but-unclicked items come first. Shows the test above can fail."""
    log = impression_log().assign(reward=1.0)
    model = rm.train(log, config=SMALL)
    recs = model.recommend(model.adapt([]), k=5)
    assert np.isin(recs.ids, np.arange(10)).mean() >= 0.6, recs.ids


def test_star_ratings_threshold_is_applied_and_logged(caplog):
    rng = np.random.default_rng(1)
    rows = []
    for u in range(80):
        for i in rng.choice(30, 12, replace=False):
            # items 0-14 watched but disliked (1-2 stars), 15-29 liked (4-5 stars)
            r = float(rng.integers(1, 3)) if i < 15 else float(rng.integers(4, 6))
            rows.append((u, int(i), len(rows), r))
    log = pd.DataFrame(rows, columns=["user", "item", "timestamp", "reward"])
    # a 3 somewhere so that the scale looks like 1-5 stars with every value
    log.loc[0, "reward"] = 3.0
    with caplog.at_level(logging.INFO, logger="recmeta"):
        model = rm.train(log, config=SMALL)
    assert model.config.positive_threshold == 4.0
    assert any("star ratings" in r.getMessage() for r in caplog.records)
    top = model.recommend(model.adapt([]), k=5).ids
    assert np.isin(top, np.arange(15, 30)).mean() >= 0.8, top


def test_positive_threshold_rules():
    assert positive_threshold(np.array([1, 2, 3, 4, 5.0]), None)[:2] == (4.0, False)
    assert positive_threshold(np.array([0.5, 1.5, 3.5, 5.0]), None)[:2] == (4.0, False)
    assert positive_threshold(np.array([1, 4, 7, 10.0]), None)[:2] == (8.0, False)
    assert positive_threshold(np.array([0, 1, 0, 1.0]), None)[:2] == (0.0, True)  # clicks
    assert positive_threshold(np.array([0.0, 12.5, 300.0]), None)[:2] == (0.0, True)  # watch time
    assert positive_threshold(np.array([1, 2, 3.0]), 2.5)[:2] == (2.5, False)


def test_explicit_threshold_and_none_positive():
    log = impression_log()
    with pytest.raises(ValueError, match="no interaction is a positive"):
        rm.train(log, config={**SMALL, "positive_threshold": 2.0})
    with pytest.raises(ValueError, match="positive_threshold"):
        rm.train(log, config={**SMALL, "positive_threshold": float("nan")})


def test_ignored_reward_like_column_warns():
    log = impression_log().rename(columns={"reward": "rating"})
    with pytest.warns(UserWarning, match="'rating' column but no 'reward'"):
        rm.train(log, config={**SMALL, "epochs": 1})


def test_duplicate_rows_warn():
    log = impression_log()
    log = pd.concat([log, log.iloc[:5]], ignore_index=True)
    with pytest.warns(UserWarning, match="5 duplicate"):
        rm.train(log, config={**SMALL, "epochs": 1})


def test_clean_log_is_silent():
    log = impression_log()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rm.train(log, config={**SMALL, "epochs": 1})


def test_mixed_id_types_raise():
    log = impression_log()
    log["item"] = log["item"].astype(object)
    log.loc[3, "item"] = str(log.loc[3, "item"])
    with pytest.raises(TypeError, match=r"interactions.item mixes id types \(int .*str"):
        rm.train(log, config={**SMALL, "epochs": 1})


# ---------------------------------------------------------------------------- tuned defaults

def _warm_log(seed=0, n_users=150, n_items=60):
    """Users with two tastes (items 0-29 or 30-59), each consuming 20 of their kind in time order."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        lo = 0 if u % 2 else 30
        for t, i in enumerate(rng.choice(np.arange(lo, lo + 30), 20, replace=False)):
            rows.append((u, int(i), t))
    return pd.DataFrame(rows, columns=["user", "item", "timestamp"])


TUNED = {"dim": 16, "hidden": 32, "encoder": "none", "epochs": 6, "batch_size": 32, "seed": 0, "validation": 0.5}


def test_validation_tuning_is_recorded_in_history_and_config():
    model = rm.train(_warm_log(), config=TUNED)
    h = model.history
    assert len(h["loss"]) == len(h["validation"]) >= 1
    assert 1 <= h["best_epoch"] <= len(h["loss"])
    assert h["validation"][h["best_epoch"] - 1] == max(h["validation"])
    # the wide part's choices are recorded in the config (saved with the model)
    cfg = model.config
    assert cfg.wide_reg is not None and cfg.wide_reg > 0
    assert cfg.wide_recency is not None and cfg.wide_pop_exp is not None
    assert "fusion" in h and "alpha" in h["fusion"]
    # the served policy separates the two tastes
    top = model.recommend([1, 2], k=5).ids
    assert np.isin(top[0], model.item_ids[:30]).all() and np.isin(top[1], model.item_ids[30:]).all()


def test_early_stopping_stops_before_the_maximum():
    model = rm.train(_warm_log(), config={**TUNED, "epochs": 40, "patience": 1})
    h = model.history
    assert len(h["loss"]) <= h["best_epoch"] + 1 < 41


def test_explicit_validation_frame():
    log = _warm_log()
    last = log.groupby("user").tail(3)
    model = rm.train(log.drop(last.index), config={**TUNED, "validation": 0.0}, validation=last)
    assert len(model.history["validation"]) >= 1
    with pytest.raises(ValueError, match="no positive interaction"):
        rm.train(log.drop(last.index), config=TUNED, validation=last.assign(user=-5))
    with pytest.raises(TypeError, match="validation must be a DataFrame"):
        rm.train(log, config=TUNED, validation=[1, 2])


def test_given_wide_settings_are_kept():
    cfg = {**TUNED, "wide_reg": 77.0, "wide_recency": 0.0, "wide_pop_exp": 0.0}
    model = rm.train(_warm_log(), config=cfg)
    assert model.config.wide_reg == 77.0
    assert model.config.wide_recency == 0.0 and model.config.wide_pop_exp == 0.0


def test_wide_recency_matches_between_serving_paths():
    """The recency-weighted wide part: the compiled core's one-user path and the network's
    batched path give the same scores."""
    model = rm.train(_warm_log(), config={**TUNED, "wide_recency": 2.0, "wide_recency_decay": 0.5})
    hist = np.array([3, 7, 3, 11, 5], np.int64)  # a repeat: its latest occurrence counts
    one = model._wide_one(hist)
    batched = model._wide_bias([hist])[0].numpy()
    np.testing.assert_allclose(one, batched, rtol=1e-5, atol=1e-5)
    plain = rm.train(_warm_log(), config={**TUNED, "wide_recency": 0.0, "wide_reg": model.config.wide_reg})
    assert not np.allclose(plain._wide_one(hist) / max(abs(plain._wide_one(hist)).max(), 1e-9),
                           one / max(abs(one).max(), 1e-9))


def test_validation_off_trains_without_validation_set():
    model = rm.train(_warm_log(), config={**TUNED, "validation": 0})
    assert "validation" not in model.history and len(model.history["loss"]) == TUNED["epochs"]
    assert model.config.wide_reg == 250.0  # the documented default without a validation set


def test_default_training_tunes_on_a_validation_set():
    """config validation None (the default) carves AUTO_VALIDATION of the users where
    validation-tuned training applies; with wide_train "learned" (the default) new users keep
    the weight alpha(n) learned in training and known users' is re-fitted."""
    from recmeta_sdk.model.network import AUTO_VALIDATION

    cfg = {k: v for k, v in TUNED.items() if k != "validation"}
    model = rm.train(_warm_log(), config=cfg)
    h = model.history
    assert model.config.validation == AUTO_VALIDATION and "validation" in h
    assert len(h["validation"]) == len(h["loss"]) == TUNED["epochs"]  # patience >= epochs: all run
    assert h["validation"][h["best_epoch"] - 1] == max(h["validation"])
    assert h["fusion"]["new_user_alpha"] == "learned in training"
    nua = model.config.new_user_alpha
    assert nua is not None and len(nua) == 5
    # the known users' curve was re-fitted: it differs from the learned one new users keep
    known = model._net.wide_coef.tolist() + model._net.wide_scale.tolist()
    assert not np.allclose(known, nua)
    # where it does not apply (here: the wide part's calibration), it is off and says so
    off = rm.train(_warm_log(), config={**cfg, "calib_users": 0.3})
    assert off.config.validation == 0.0 and "validation" not in off.history


def test_num_threads_and_progress_without_tqdm(monkeypatch, caplog):
    import sys

    import torch

    before = torch.get_num_threads()
    monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm fails
    with caplog.at_level(logging.WARNING, logger="recmeta"):
        rm.train(_warm_log(), config={**TUNED, "epochs": 1}, num_threads=1, progress=True)
    assert torch.get_num_threads() == before
    assert any("tqdm is not installed" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match="num_threads must be a positive int"):
        rm.train(_warm_log(), config=TUNED, num_threads=0)


# ---------------------------------------------------------------------------- new users in the validation

def _long_log(n_users=200, n_items=60, seed=3):
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        n = int(rng.integers(10, 40))
        for t, i in enumerate(rng.choice(n_items, n, replace=False)):
            rows.append((u, int(i), t, float(rng.random() < 0.8)))
    return pd.DataFrame(rows, columns=["user", "item", "timestamp", "reward"])


def test_cold_split_holds_out_whole_users():
    from recmeta_sdk.training.loop import COLD_QUERY_AFTER, Validation, cold_split, prepare

    prep = prepare(_long_log())
    rng = np.random.default_rng(0)
    exclude = np.arange(0, 200, 2)
    rest, cold = cold_split(prep, 0.2, rng, exclude=exclude)
    n = np.diff(prep.offsets)
    assert len(cold) >= 10 and not np.isin(cold, exclude).any()
    assert (np.diff(rest.offsets)[cold] == 0).all()  # their rows are gone ...
    others = np.setdiff1d(np.arange(len(n)), cold)
    assert (np.diff(rest.offsets)[others] == n[others]).all()  # ... and nobody else's
    assert rest.item_count.sum() == len(rest.items) == n[others].sum()
    for u in cold:  # each qualifies: a positive in the first 5 and one after COLD_QUERY_AFTER
        r = prep.rewards[prep.offsets[u]:prep.offsets[u + 1]]
        assert (r[:5] > 0).any() and (r[COLD_QUERY_AFTER:] > 0).any()
    # the samples scored as the cold-start protocol: first k positives, truth after 20
    val = Validation(prep, np.array([1, 3, 5]), [{0}, {1}, {2}])
    val.add_cold(prep, cold)
    assert [s[0] for s in val.samples] == ["warm"]  # (3 users: too few for prefix samples)
    assert [s[0] for s in val.cold] == ["new users, first 5", "new users, first 10", "new users, first 20"]
    _, _, hists, _, _, truth, excl = val.cold[0]
    u = cold[0]
    it, r = prep.items[prep.offsets[u]:prep.offsets[u + 1]], prep.rewards[prep.offsets[u]:prep.offsets[u + 1]]
    np.testing.assert_array_equal(hists[0], it[:5][r[:5] > 0])
    assert truth[0] == set(it[COLD_QUERY_AFTER:][r[COLD_QUERY_AFTER:] > 0].tolist())
    np.testing.assert_array_equal(excl[0], np.unique(it[:COLD_QUERY_AFTER]))
    # too few qualifying users: nothing held out
    rest, cold = cold_split(prep, 0.01, rng)
    assert rest is prep and len(cold) == 0


def test_alpha_curve_is_the_networks_formula():
    import math

    import torch

    from recmeta_sdk.model import Config, ItemFeatures, RecMetaNet
    from recmeta_sdk.training.loop import FUSION_KNOTS, _alpha_curve, _alpha_params

    net = RecMetaNet(Config(dim=8, hidden=8, encoder="none"), ItemFeatures.identity(30))
    for curve in [(2.0, 8.0, 256.0, 100.0), (0.5, 0.5, 4096.0, 25.0), (3.0, 3.0, 3.0, 50.0)]:
        coef, scale = _alpha_params(*curve)
        n = torch.tensor([0, 1, 5, 10, 20, 37, 100, 500, 10000])
        with torch.no_grad():
            net.wide_coef.copy_(coef)
            net.wide_scale.copy_(scale)
            got = net.wide_alpha(n)
            at_hi = float(net.wide_alpha(torch.tensor([int(curve[3])])))
        np.testing.assert_allclose(got.numpy(), _alpha_curve(torch.log1p(n.float()), *curve).numpy(), rtol=1e-5)
        at = dict(zip(n.tolist(), got.tolist()))
        assert math.isclose(at[int(FUSION_KNOTS[0])], curve[0], rel_tol=1e-4)
        assert math.isclose(at[int(FUSION_KNOTS[1])], curve[1], rel_tol=1e-4)
        assert math.isclose(at_hi, curve[2], rel_tol=1e-4)
        assert (got[1:].diff() >= -1e-6).all()  # never decreasing from one item on


def test_tuned_training_fits_short_histories_on_new_users(tmp_path):
    import torch

    # wide_train "residual": new users' alpha(n) fitted on the cold stand-ins ("learned", the
    # default, keeps the one learned in training: test_default_training_tunes_on_a_validation_set)
    model = rm.train(_long_log(), config={**TUNED, "validation": 0.3, "validation_cold": 0.2, "wide_train": "residual"})
    fus = model.history["fusion"]
    assert {"warm", "first 5", "new users, first 5", "new users, first 10", "new users, first 20"} <= set(fus)
    for key in ("alpha", "new_user_alpha"):
        a_lo, a_mid, a_hi, n_hi = fus[key]
        assert 0 < a_lo <= a_mid and a_hi > 0 and n_hi > 20
    assert fus["new_user_alpha"][2:] == fus["alpha"][2:]  # long new-user histories: as known users
    nua = model.config.new_user_alpha
    assert isinstance(nua, list) and len(nua) == 5
    # new users (adapt) are served with their own weight, known users with theirs, on every path
    net = model._net
    hist = np.array([3, 7, 11, 5, 19, 23], np.int64)
    with torch.no_grad():
        n = torch.tensor([len(hist)])
        a_new, a_known = float(net.wide_alpha(n, True)), float(net.wide_alpha(n))
        assert a_new != a_known
        rows = torch.zeros(len(hist), dtype=torch.int64)
        new_off = net.wide_offset(rows, torch.from_numpy(hist), 1, new=True)[0].numpy()
        known_off = net.wide_offset(rows, torch.from_numpy(hist), 1)[0].numpy()
    np.testing.assert_allclose(new_off * a_known, known_off * a_new, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(model._wide_one(hist, True), new_off, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model._wide_one(hist), known_off, rtol=1e-5, atol=1e-6)
    state = model.adapt(model.item_ids[hist])
    np.testing.assert_allclose(model._state_wide(state), new_off, rtol=1e-5, atol=1e-6)
    u = model.user_ids[0]
    known = model.user_state(u)
    with torch.no_grad():
        h_u = torch.from_numpy(known.history)
        ref = net.wide_offset(torch.zeros(len(h_u), dtype=torch.int64), h_u, 1)[0].numpy()
    np.testing.assert_allclose(model._state_wide(known), ref, rtol=1e-5, atol=1e-6)
    # saved and loaded with the model
    path = tmp_path / "m.recmeta"
    model.save(path)
    back = rm.load(path)
    assert back.config.new_user_alpha == nua
    np.testing.assert_array_equal(back.adapt(model.item_ids[hist]).vector, state.vector)
    np.testing.assert_array_equal(back._state_wide(back.adapt(model.item_ids[hist])), model._state_wide(state))
    with pytest.raises(ValueError, match="new_user_alpha"):
        rm.train(_long_log(), config={**TUNED, "new_user_alpha": [1.0, 0.0, 0.0, 5.0, 2.0]})
    with pytest.raises(ValueError, match="validation_cold"):
        rm.train(_long_log(), config={**TUNED, "validation_cold": 1.5})
