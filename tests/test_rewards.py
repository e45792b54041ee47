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
