"""The reward posterior of the online loop (recmeta_sdk.online.posterior) against a dense numpy
reference, and its use by Recommender.feedback: misses change the served scores."""
import copy
import pickle

import numpy as np
import pandas as pd
import pytest

import recmeta_sdk as rm
from recmeta_sdk import online
from recmeta_sdk.online import posterior

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# the reward posterior alone: the in-session evidence (its own tests: test_online_evidence.py) off
TINY = {"dim": 16, "hidden": 32, "seq_len": 5, "layers": 1, "heads": 2, "epochs": 4, "batch_size": 32,
        "lr": 0.01, "inner_steps": 1, "feedback_evidence": 0.0}


def _random_log(rng, n_users, n_items, density=0.3, scale=5.0):
    offsets, items, rewards = [0], [], []
    for _ in range(n_users):
        n = int(rng.integers(1, max(2, int(density * n_items))))
        it = rng.choice(n_items, size=n, replace=True)  # repeats: the last reward counts
        items.append(it)
        rewards.append(rng.integers(-1, 6, size=n).astype(np.float32))  # negatives clip to 0
        offsets.append(offsets[-1] + n)
    return np.array(offsets), np.concatenate(items), np.concatenate(rewards), scale


def _dense_reference(offsets, items, rewards, n_items, scale):
    U = len(offsets) - 1
    X = np.zeros((U, n_items))
    for u in range(U):
        for i, r in zip(items[offsets[u]:offsets[u + 1]], rewards[offsets[u]:offsets[u + 1]]):
            X[u, i] = max(float(r), 0.0) / scale  # in log order: the last one stays
    mu = X.mean(0)
    S = (X - mu).T @ (X - mu) / U
    return mu, S


@pytest.mark.parametrize("seed,n_users,n_items", [(0, 7, 5), (1, 40, 23), (2, 113, 61)])
def test_correction_matches_the_dense_gaussian_conditional(seed, n_users, n_items):
    rng = np.random.default_rng(seed)
    off, it, rw, scale = _random_log(rng, n_users, n_items)
    post = posterior.RewardPosterior(off, it, rw, n_items, scale)
    mu, S = _dense_reference(off, it, rw, n_items, scale)
    np.testing.assert_allclose(post.mu, mu, rtol=1e-12, atol=1e-12)
    for n_obs in (1, 3, min(9, n_items)):
        obs = rng.choice(n_items, size=n_obs, replace=False)
        np.testing.assert_allclose(post.columns(obs), S[:, obs], rtol=1e-10, atol=1e-12)
        y = rng.integers(0, 2, size=n_obs).astype(np.float64)
        lam = float(rng.uniform(0.05, 0.5))
        ref = S[:, obs] @ np.linalg.solve(S[np.ix_(obs, obs)] + lam * np.eye(n_obs), y - mu[obs])
        np.testing.assert_allclose(post.correction(obs, y, lam), ref, rtol=1e-9, atol=1e-12)
        # a prior mean other than mu enters through the residual only
        prior = rng.uniform(0, 1, n_items)
        ref = S[:, obs] @ np.linalg.solve(S[np.ix_(obs, obs)] + lam * np.eye(n_obs), y - prior[obs])
        np.testing.assert_allclose(post.correction(obs, y, lam, prior=prior), ref, rtol=1e-9, atol=1e-12)


def test_repeated_observation_counts_with_its_last_reward():
    rng = np.random.default_rng(3)
    off, it, rw, scale = _random_log(rng, 30, 12)
    post = posterior.RewardPosterior(off, it, rw, 12, scale)
    a = post.correction(np.array([4, 7, 4]), np.array([1.0, 0.0, 0.0]), 0.1)
    b = post.correction(np.array([7, 4]), np.array([0.0, 0.0]), 0.1)
    np.testing.assert_allclose(a, b, rtol=1e-12)
    np.testing.assert_array_equal(post.correction(np.zeros(0, np.int64), np.zeros(0), 0.1), np.zeros(12))


def test_an_item_nobody_has_has_a_zero_column():
    off, it, rw = np.array([0, 2, 3]), np.array([0, 1, 1]), np.array([1.0, 1.0, 1.0], np.float32)
    post = posterior.RewardPosterior(off, it, rw, 4, 1.0)
    mu, S = _dense_reference(off, it, rw, 4, 1.0)
    np.testing.assert_array_equal(post.columns(np.array([3, 2])), np.zeros((4, 2)))
    obs, y = np.array([3, 0]), np.array([0.0, 1.0])
    ref = S[:, obs] @ np.linalg.solve(S[np.ix_(obs, obs)] + 0.2 * np.eye(2), y - mu[obs])
    np.testing.assert_allclose(post.correction(obs, y, 0.2), ref, rtol=1e-12, atol=1e-15)


def test_bad_inputs_are_named():
    rng = np.random.default_rng(4)
    off, it, rw, scale = _random_log(rng, 10, 6)
    post = posterior.RewardPosterior(off, it, rw, 6, scale)
    with pytest.raises(ValueError, match="lam"):
        post.correction(np.array([1]), np.array([1.0]), 0.0)
    with pytest.raises(ValueError, match="out of range"):
        post.correction(np.array([6]), np.array([1.0]), 0.1)
    with pytest.raises(ValueError, match="finite"):
        post.correction(np.array([1]), np.array([np.nan]), 0.1)
    with pytest.raises(ValueError, match="one length"):
        post.correction(np.array([1, 2]), np.array([1.0]), 0.1)
    with pytest.raises(ValueError, match="reward_scale"):
        posterior.RewardPosterior(off, it, rw, 6, 0.0)
    with pytest.raises(ValueError, match="out of range"):
        posterior.RewardPosterior(off, it, rw, 3, scale)
    # a copy / pickle rebuilds an equal posterior
    for p2 in (copy.deepcopy(post), pickle.loads(pickle.dumps(post))):
        np.testing.assert_array_equal(p2.correction(np.array([1, 2]), np.array([1.0, 0.0]), 0.1),
                                      post.correction(np.array([1, 2]), np.array([1.0, 0.0]), 0.1))


def _pairs_log(n_users=120, seed=0):
    """Items come in pairs (2j, 2j+1) that users take together; 30 items, 5 pairs per user."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        for t, p in enumerate(rng.choice(15, size=5, replace=False)):
            rows += [(f"u{u}", int(2 * p), 2 * t, 1.0), (f"u{u}", int(2 * p + 1), 2 * t + 1, 1.0)]
    return pd.DataFrame(rows, columns=["user", "item", "timestamp", "reward"])


@pytest.fixture(scope="module")
def pairs_model():
    return rm.train(_pairs_log(), config=TINY, progress=False)


def test_a_miss_lowers_the_items_that_go_with_it(pairs_model):
    m = pairs_model
    st = online.OnlineStore(m, known_users=False)
    st.feedback([("n", 0, 1.0, 0.5)])  # a hit on item 0
    v1 = st.current("n")
    assert v1.state.item_bias is not None and v1.state.item_bias.shape == (m.n_items,)
    st.feedback([("n", 4, 0.0, 0.5)])  # a miss on item 4, whose partner is item 5
    v2 = st.current("n")
    # the encoder state did not move (a miss is not read by it); the item bias did
    np.testing.assert_array_equal(v2.state.vector, v1.state.vector)
    pos = {i: j for j, i in enumerate(m.item_ids.tolist())}
    d = v2.state.item_bias - v1.state.item_bias
    others = [d[pos[i]] for i in range(6, 30)]
    assert d[pos[5]] < min(others), (d[pos[5]], min(others))  # the miss's partner drops the most
    s1 = m.recommend(v1.state, k=m.n_items, exclude_seen=False)
    s2 = m.recommend(v2.state, k=m.n_items, exclude_seen=False)
    r1 = list(s1.ids).index(5)
    r2 = list(s2.ids).index(5)
    assert r2 > r1, (r1, r2)  # and ranks lower in the served list
    # the hit's partner is the top recommendation
    assert m.recommend(v2.state, k=1).ids[0] == 1


def test_feedback_posterior_zero_is_the_encoder_and_steps_alone(pairs_model):
    m = copy.copy(pairs_model)
    m.config = copy.copy(m.config)
    m.config.feedback_posterior = 0.0
    st = online.OnlineStore(m, known_users=False)
    st.feedback([("n", 0, 1.0, 0.5), ("n", 4, 0.0, 0.5)])
    cur = st.current("n")
    assert cur.state.item_bias is None
    ref = m.adapt({"item": [0], "reward": [1.0]})
    np.testing.assert_array_equal(cur.state.vector, ref.vector)
    a = m.recommend(cur.state, k=5)
    b = m.recommend(ref, k=5, exclude=[4])
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_array_equal(a.scores, b.scores)


def test_item_bias_enters_the_scores_and_explanations(pairs_model):
    m = pairs_model
    st = m.adapt({"item": [0, 2], "reward": [1.0, 1.0]})
    rng = np.random.default_rng(5)
    bias = rng.normal(size=m.n_items).astype(np.float32)
    from dataclasses import replace

    sb = replace(st, item_bias=bias)
    a = m.recommend(st, k=m.n_items - 2)
    b = m.recommend(sb, k=m.n_items - 2)
    pos = {i: j for j, i in enumerate(m.item_ids.tolist())}
    sa = dict(zip(a.ids.tolist(), a.scores.tolist()))
    for i, s in zip(b.ids.tolist(), b.scores.tolist()):
        assert s == pytest.approx(sa[i] + bias[pos[i]] / m.config.temperature, rel=1e-5, abs=1e-5)
    ex = m.recommend(sb, k=3, explain=True).explanations
    for e in ex:
        assert e["feedback"] == pytest.approx(bias[pos[e["item"]]] / m.config.temperature)
    with pytest.raises(ValueError, match="item_bias"):
        m.recommend(replace(st, item_bias=np.zeros(3, np.float32)), k=3)


def test_known_user_gets_the_correction_without_the_population_mean(pairs_model):
    m = pairs_model
    st = online.OnlineStore(m)  # known users start from their training state
    st.feedback([("u0", 4, 0.0, 0.5)])
    cur = st.current("u0")
    assert cur.known and cur.n_prior > 0
    post = posterior.of_model(m)
    pos4 = int(np.flatnonzero(m.item_ids == 4)[0])
    ref = post.correction(np.array([pos4]), np.array([0.0]), m.config.feedback_reg)
    scale = posterior.score_scale(m)
    np.testing.assert_allclose(cur.state.item_bias, (m.config.feedback_posterior * scale * ref).astype(np.float32),
                               rtol=1e-5, atol=1e-6)
