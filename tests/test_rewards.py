"""Rewards mean what users mean: reward-0 rows are impressions, never supervised targets;
star ratings get a positive threshold; ignored reward-like columns, duplicate rows and mixed
id types are never silent."""
import logging
import warnings

import numpy as np
import pandas as pd
import pytest

import recmeta_sdk as rm
from recmeta_sdk.train import positive_threshold

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


def test_default_training_has_no_validation_set():
    model = rm.train(_warm_log(), config={k: v for k, v in TUNED.items() if k != "validation"})
    assert "validation" not in model.history and len(model.history["loss"]) == TUNED["epochs"]
    assert model.config.wide_reg == 250.0  # the documented default without a validation set


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
