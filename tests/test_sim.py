"""Simulator, MovieLens replay, the online loop and the baseline bandits."""
import itertools
import types

import numpy as np
import pandas as pd
import pytest

from recmeta_sdk.evaluation import bandits
from recmeta_sdk.evaluation import sim

SMALL = sim.SimConfig(n_items=50, dim=4, n_segments=4, n_test_segments=2, users_per_segment=10, seed=3)


def _per_round(cum):
    return np.diff(np.hstack([np.zeros((cum.shape[0], 1)), cum]), axis=1)


# ----------------------------------------------------------------------------- simulator

def test_config_validation():
    with pytest.raises(ValueError, match="n_items"):
        sim.UserSimulator(n_items=0)
    with pytest.raises(ValueError, match="slate_size"):
        sim.UserSimulator(n_items=3, slate_size=4)
    with pytest.raises(ValueError, match="drift"):
        sim.UserSimulator(drift=-0.1)
    with pytest.raises(ValueError, match="unknown SimConfig"):
        sim.UserSimulator(n_itmes=5)


def test_seeded_and_segments():
    a = sim.UserSimulator(SMALL)
    b = sim.UserSimulator(SMALL)
    c = sim.UserSimulator(SMALL, seed=4)
    np.testing.assert_array_equal(a.attractiveness(41), b.attractiveness(41))
    assert not np.allclose(a.attractiveness(41), c.attractiveness(41))
    # new users come from segments never seen among the existing users
    assert set(a.user_segment[a.train_users]) == {0, 1, 2, 3}
    assert set(a.user_segment[a.test_users]) == {4, 5}
    np.testing.assert_array_equal(a.users, a.test_users)
    # segments are different tasks: their optimal items differ
    best = {s: a.optimal_slate(int(np.flatnonzero(a.user_segment == s)[0]), 3).tolist() for s in range(6)}
    assert len({tuple(v) for v in best.values()}) > 3


def test_optimal_slate_is_the_brute_force_optimum_and_ordered_by_position_bias():
    env = sim.UserSimulator(n_items=7, dim=3, n_segments=2, n_test_segments=1, users_per_segment=3,
                            slate_size=3, position_bias=1.0, seed=11)
    for user in (0, 4, 8):
        best = max(itertools.permutations(range(7), 3), key=lambda s: env.expected_reward(user, s))
        opt = env.optimal_slate(user)
        assert env.expected_reward(user, opt) == pytest.approx(env.expected_reward(user, best), abs=1e-12)
        a = env.attractiveness(user)
        assert np.all(np.diff(a[opt]) <= 0)  # most attractive item on the most examined position
        ex = opt[:1]
        opt2 = env.optimal_slate(user, 3, exclude=ex)
        assert ex[0] not in opt2
        assert env.expected_reward(user, opt2) < env.expected_reward(user, opt)


def test_step_click_frequencies_match_the_click_model():
    env = sim.UserSimulator(n_items=11, dim=3, n_segments=2, users_per_segment=2, slate_size=3,
                            position_bias=1.5, click_offset=0.0, seed=5)
    rng = np.random.default_rng(0)
    slate = np.array([4, 9, 2])
    n = 40_000
    clicks = np.array([env.step(1, slate, 0, rng) for _ in range(n)])
    p = env.examination * env.attractiveness(1)[slate]
    np.testing.assert_allclose(env.examination, [1.0, 2 ** -1.5, 3 ** -1.5])
    se = np.sqrt(p * (1 - p) / n)
    assert np.all(np.abs(clicks.mean(axis=0) - p) < 4 * se)
    assert env.expected_reward(1, slate) == pytest.approx(p.sum())


def test_interest_drift_is_seeded_and_query_order_free():
    a = sim.UserSimulator(SMALL, drift=0.3)
    b = sim.UserSimulator(SMALL, drift=0.3)
    late = a.preference(42, 150).copy()
    for t in range(0, 151, 7):
        b.preference(42, t)
    np.testing.assert_array_equal(b.preference(42, 150), late)
    assert np.linalg.norm(a.preference(42, 150) - a.preference(42, 0)) > 0.5
    np.testing.assert_array_equal(a.preference(42, 0), a.user_pref0[42])
    still = sim.UserSimulator(SMALL)
    np.testing.assert_array_equal(still.preference(42, 150), still.preference(42, 0))
    # with drift the optimum moves
    assert not np.array_equal(a.optimal_slate(42, 5, t=0), a.optimal_slate(42, 5, t=400))


def test_log_random_has_uniform_propensities():
    env = sim.UserSimulator(SMALL, slate_size=2)
    logs = env.log_random(users=env.train_users[:5], n_rounds=4, seed=1)
    assert len(logs) == 5 * 4 * 2
    assert np.all(logs["propensity"] == 1.0 / env.n_items)
    assert set(logs["position"]) == {0, 1}
    assert set(np.unique(logs["reward"])) <= {0.0, 1.0}


def test_linucb_approaches_the_optimum_and_random_does_not():
    env = sim.UserSimulator(SMALL)
    pop = env.item_popularity()
    feats = np.hstack([env.item_features, np.log(pop / (1 - pop))[:, None], np.ones((env.n_items, 1))])
    res = sim.run_benchmark(env, {
        "linucb": lambda e: bandits.LinUCB(feats, alpha=0.5, lam=1.0),
        "random": lambda e: bandits.RandomPolicy(e.n_items, seed=0),
        "oracle": bandits.OraclePolicy,
    }, T=300, checkpoints=(1, 50, 300), track_optimal=True)
    ratio = {}
    for nm, r in res.items():
        e, o = _per_round(r.expected), _per_round(r.optimal)
        ratio[nm] = (e[:, :10].mean() / o[:, :10].mean(), e[:, -50:].mean() / o[:, -50:].mean())
    assert ratio["oracle"] == (1.0, 1.0)
    assert ratio["linucb"][0] < 0.7          # starts far from the optimum ...
    assert ratio["linucb"][1] > 0.85         # ... and approaches it
    assert ratio["random"][1] < 0.5
    # the realised rewards tell the same story
    assert res["linucb"].mean(300) > res["random"].mean(300) + 10 * res["linucb"].se(300)


# ----------------------------------------------------------------------------- the loop

class _Recorder:
    def __init__(self, inner):
        self.inner, self.log = inner, []

    def recommend(self, ctx, k, exclude):
        s = self.inner.recommend(ctx, k, exclude)
        self.log.append((ctx.user, ctx.t, s.copy(), exclude.copy()))
        return s

    def feedback(self, user, item, reward):
        self.log.append(("fb", user, item, reward))
        self.inner.feedback(user, item, reward)


def test_run_online_statistics_and_bad_policies():
    env = sim.UserSimulator(SMALL, slate_size=2)
    r = sim.run_online(env, lambda e: bandits.RandomPolicy(e.n_items, seed=1), T=12, checkpoints=(1, 5, 12))
    assert r.cumulative.shape == (len(env.users), 12)
    assert np.all(np.diff(r.cumulative, axis=1) >= 0)
    col = r.cumulative[:, 4]
    assert r.mean(5) == pytest.approx(col.mean())
    assert r.se(5) == pytest.approx(col.std(ddof=1) / np.sqrt(col.size))
    assert set(r.table()) == {1, 5, 12}
    # the same seed gives the same rewards
    r2 = sim.run_online(env, lambda e: bandits.RandomPolicy(e.n_items, seed=1), T=12)
    np.testing.assert_array_equal(r.cumulative, r2.cumulative)

    class Dup:
        def recommend(self, ctx, k, exclude):
            return np.zeros(k, dtype=np.int64)

        def feedback(self, *a):
            pass

    with pytest.raises(ValueError, match="duplicate"):
        sim.run_online(env, lambda e: Dup(), T=1)
    with pytest.raises(ValueError, match="T must be"):
        sim.run_online(env, lambda e: Dup(), T=0)


def test_plot_curves_writes_png_or_reports_missing_matplotlib(tmp_path):
    env = sim.UserSimulator(SMALL)
    res = sim.run_benchmark(env, {"pop": lambda e: bandits.PopularityPolicy(e.item_popularity())}, T=5)
    out = tmp_path / "curves.png"
    drawn = sim.plot_curves(res, out)
    try:
        import matplotlib  # noqa: F401
        assert drawn and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    except ImportError:
        assert drawn is False and not out.exists()
    assert "pop" in sim.format_table(res)


# ----------------------------------------------------------------------------- replay

def _toy_ratings():
    # 10 users x 8 items; ratings chosen by hand
    rows = []
    rng = np.random.default_rng(7)
    for u in range(10):
        for i in rng.choice(8, size=5, replace=False):
            rows.append((100 + u, 1000 + int(i), float(rng.integers(1, 6))))
    return pd.DataFrame(rows, columns=["user", "item", "reward"])


def test_replay_rewards_match_ratings_and_no_repeats_on_toy_data():
    df = _toy_ratings()
    env = sim.MovieLensReplay(df, test_fraction=0.3, seed=1)
    assert len(env.users) == 3 and len(env.train_users) == 7
    assert not set(env.users) & set(env.train_users)
    rec = _Recorder(bandits.RandomPolicy(env.n_items, seed=0))
    res = sim.run_online(env, lambda e: rec, T=8, checkpoints=(1, 8))
    rated = {(r.user, r.item): r.reward for r in df.itertuples()}
    for user in env.users:
        served = [int(e[2][0]) for e in rec.log if e[0] == user]
        assert sorted(served) == list(range(8))  # every item once: no repeats
        for e in rec.log:
            if e[0] == "fb" and e[1] == user:
                raw = rated.get((env.user_ids[user], env.item_ids[e[2]]))
                assert e[3] == (1.0 if raw is not None and raw >= 4 else 0.0)
    # serving every item once collects every liked item
    liked = [len(env.liked_items(u)) for u in env.users]
    np.testing.assert_array_equal(res.cumulative[:, -1], liked)
    with pytest.raises(ValueError, match="exceeds n_items"):
        sim.run_online(env, lambda e: rec, T=9)


@pytest.fixture(scope="module")
def ml_ratings():
    from recmeta_sdk import datasets

    return datasets.load("ml-100k").interactions


def test_movielens_replay_protocol_and_bars(ml_ratings):
    env = sim.MovieLensReplay(ml_ratings)
    assert (env.n_users, env.n_items) == (943, 1682)
    assert (len(env.users), len(env.train_users)) == (188, 755)
    for u in env.users[:5]:
        mine = ml_ratings[ml_ratings["user"] == env.user_ids[u]]
        want = np.zeros(env.n_items)
        want[np.searchsorted(env.item_ids, mine["item"].to_numpy())] = (mine["reward"].to_numpy() >= 4)
        np.testing.assert_array_equal(env.step(u, np.arange(env.n_items), 0), want)
        assert want.sum() > 0
    pop = env.train_matrix(liked_only=True).sum(axis=0)
    rec = _Recorder(bandits.PopularityPolicy(pop))
    res = sim.run_benchmark(env, {"popularity": lambda e: rec, "oracle": bandits.OraclePolicy}, T=50)
    for user in env.users[:20]:
        served = [int(e[2][0]) for e in rec.log if e[0] == user]
        assert len(served) == 50 == len(set(served))
    # the bars of quality.md section 3 (the protocol is deterministic for these two)
    assert round(res["oracle"].mean(10), 2) == 9.78 and round(res["oracle"].mean(50), 2) == 35.25
    assert round(res["popularity"].mean(10), 2) == 3.90 and round(res["popularity"].mean(50), 2) == 13.84


# ----------------------------------------------------------------------------- bandits

def test_top_k_ties_and_exclusion():
    s = np.array([1.0, 3.0, 3.0, 2.0, 3.0, 0.5])
    np.testing.assert_array_equal(bandits._top_k(s, 2, np.array([], dtype=np.int64)), [1, 2])
    np.testing.assert_array_equal(bandits._top_k(s, 3, np.array([2])), [1, 4, 3])
    np.testing.assert_array_equal(bandits._top_k(s, 6, np.array([], dtype=np.int64)), [1, 2, 4, 3, 0, 5])


def test_linucb_sherman_morrison_matches_direct_solution():
    rng = np.random.default_rng(2)
    X = rng.standard_normal((13, 5))
    theta0 = rng.standard_normal(5)
    pol = bandits.LinUCB(X, alpha=0.7, lam=2.0, theta0=theta0)
    items = [3, 7, 3, 11, 0]
    rewards = [1.0, 0.0, 1.0, 1.0, 0.0]
    for i, r in zip(items, rewards):
        pol.feedback("u", i, r)
    A = 2.0 * np.eye(5) + sum(np.outer(X[i], X[i]) for i in items)
    b = 2.0 * theta0 + sum(r * X[i] for i, r in zip(items, rewards))
    A_inv = np.linalg.inv(A)
    want = X @ (A_inv @ b) + 0.7 * np.sqrt(np.einsum("ij,jk,ik->i", X, A_inv, X))
    np.testing.assert_allclose(pol.scores("u"), want, rtol=1e-10)
    # another user is untouched: the prior
    np.testing.assert_allclose(pol.scores("v"), X @ theta0 + 0.7 * np.sqrt((X * X).sum(1) / 2.0))


def test_ease_closed_form_and_online_fold_in():
    rng = np.random.default_rng(4)
    X = (rng.random((23, 7)) < 0.4).astype(float)
    B = bandits.fit_ease(X, lam=3.0)
    assert np.all(np.diag(B) == 0)
    # EASE's optimality condition: off the diagonal, (XᵀX + λI) B = XᵀX
    G = X.T @ X
    lhs = (G + 3.0 * np.eye(7)) @ B
    off = ~np.eye(7, dtype=bool)
    np.testing.assert_allclose(lhs[off], G[off], atol=1e-9)
    pop = X.sum(0)
    pol = bandits.EASEOnline(B, pop)
    ctx = sim.UserContext("u", 0)
    none = np.zeros(0, dtype=np.int64)
    np.testing.assert_array_equal(pol.recommend(ctx, 3, none), bandits._top_k(pop, 3, none))
    pol.feedback("u", 2, 0.0)  # a miss is not folded in
    np.testing.assert_array_equal(pol.scores("u"), pop)
    pol.feedback("u", 2, 1.0)
    pol.feedback("u", 5, 1.0)
    assert np.argmax(pol.scores("u") - 1e-6 * np.isin(np.arange(7), [2, 5])) == \
        np.argmax(np.where(np.isin(np.arange(7), [2, 5]), -np.inf, B[2] + B[5]))


def test_epsilon_greedy_rate_and_svd_embeddings():
    pop = np.arange(40, dtype=float)[::-1]
    pol = bandits.EpsilonGreedyPopularity(pop, 0.1, seed=0)
    none = np.zeros(0, dtype=np.int64)
    picks = np.array([pol.recommend(sim.UserContext(0, t), 1, none)[0] for t in range(4000)])
    # greedy pick is item 0; a random pick is item 0 with prob 1/40
    assert (picks != 0).mean() == pytest.approx(0.1 * 39 / 40, abs=0.015)
    s = pol.recommend(sim.UserContext(0, 0), 5, np.array([0, 1]))
    assert len(set(s)) == 5 and not set(s) & {0, 1}
    X = (np.random.default_rng(1).random((30, 12)) < 0.3).astype(float)
    items, mean_user = bandits.svd_item_embeddings(X, 12)
    assert items.shape == (12, 13) and mean_user.shape == (13,)
    np.testing.assert_allclose(items @ mean_user, X.mean(axis=0), atol=1e-10)  # full rank: exact


def test_recommender_adapter():
    class FakeRecommender:  # the adapt / recommend signature of recmeta_sdk.Recommender
        def __init__(self):
            self.adapted = []

        def adapt(self, history, *, steps=None):
            self.adapted.append((list(history["item"]), list(history["reward"]), steps))
            return ("state", tuple(history["item"]))

        def recommend(self, state, k=10, *, exclude=None, exclude_seen=True):
            ex = set(exclude or []) | (set(state[1]) if exclude_seen else set())
            ids = [i for i in range(1000, 1008) if i not in ex][:k]
            return types.SimpleNamespace(ids=np.array(ids), scores=np.zeros(k))

    fake = FakeRecommender()
    env = sim.MovieLensReplay(_toy_ratings(), test_fraction=0.3, seed=1)
    res = sim.run_online(env, lambda e: bandits.RecommenderPolicy(fake, item_ids=e.item_ids, adapt_steps=2), T=3)
    # one adaptation per round, from the growing history (external ids and rewards)
    assert len(fake.adapted) == 3 * len(env.users)
    assert fake.adapted[0] == ([], [], 2)
    u0 = env.users[0]
    assert fake.adapted[2][0] == [1000, 1001]  # items 0 and 1 (external 1000, 1001) served first
    assert fake.adapted[2][1] == [env.step(u0, [0], 0)[0], env.step(u0, [1], 1)[0]]
    np.testing.assert_array_equal(res.cumulative[:, -1], [env.step(u, [0, 1, 2], 0).sum() for u in env.users])
    with pytest.raises(TypeError, match="adapt"):
        bandits.RecommenderPolicy(object())


def test_paired_difference_of_two_runs():
    a = sim.OnlineResult("a", np.array([[1.0, 2.0], [0.0, 1.0], [1.0, 3.0]]))
    b = sim.OnlineResult("b", np.array([[0.0, 1.0], [0.0, 0.0], [1.0, 1.0]]))
    m, se = a.difference(b, 2)
    d = np.array([1.0, 1.0, 2.0])
    assert m == pytest.approx(d.mean()) and se == pytest.approx(d.std(ddof=1) / np.sqrt(3))
    assert a.difference(b, 1) == pytest.approx((1 / 3, np.array([1.0, 0.0, 0.0]).std(ddof=1) / np.sqrt(3)))
    with pytest.raises(ValueError, match="same users"):
        a.difference(sim.OnlineResult("c", np.zeros((2, 2))), 1)
    with pytest.raises(ValueError, match="t=3"):
        a.difference(b, 3)
