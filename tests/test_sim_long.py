"""The long-horizon session simulator, its loop (run_sessions), its logs and its oracles."""
import itertools

import numpy as np
import pandas as pd
import pytest

from recmeta_sdk.evaluation import bandits
from recmeta_sdk.evaluation import sim

SMALL = sim.LongSimConfig(n_items=60, dim=4, n_clusters=6, n_train_users=20, n_test_users=30, max_steps=40,
                          seed=1)


def _random(env):
    return bandits.RandomPolicy(env.n_items, seed=5)


class _WorstItems:
    """Repeats the slate of the lowest expected reward plus budget, in the true state."""

    def __init__(self, env):
        self.env = env

    def recommend(self, ctx, k, exclude):
        value = self.env.attractiveness(ctx.user) * (1.0 + self.env.budget_per_click)
        return np.argsort(value, kind="stable")[:k].astype(np.int64)

    def feedback(self, user, item, reward):
        pass


# ----------------------------------------------------------------------------- determinism

def test_seeded_world_logs_and_runs():
    a, b = sim.LongSessionSimulator(SMALL), sim.LongSessionSimulator(SMALL)
    c = sim.LongSessionSimulator(SMALL, seed=2)
    np.testing.assert_array_equal(a.item_quality, b.item_quality)
    np.testing.assert_array_equal(a.item_features, b.item_features)
    assert not np.allclose(a.item_quality, c.item_quality)
    pd.testing.assert_frame_equal(a.log_sessions(seed=3), b.log_sessions(seed=3))
    assert not a.log_sessions(seed=3).equals(a.log_sessions(seed=4))
    r1 = sim.run_sessions(a, _random, seed=7)
    r2 = sim.run_sessions(b, _random, seed=7)
    np.testing.assert_array_equal(r1.reward, r2.reward)
    np.testing.assert_array_equal(r1.steps, r2.steps)
    # the same env serves a second run from scratch (reset), with the same outcome
    r3 = sim.run_sessions(a, _random, seed=7)
    np.testing.assert_array_equal(r1.reward, r3.reward)
    assert not np.array_equal(r1.reward, sim.run_sessions(a, _random, seed=8).reward)


def test_interest_drift_does_not_depend_on_the_policy():
    env = sim.LongSessionSimulator(SMALL, drift=0.3, satiation_weight=0.0, item_satiation_weight=0.0)
    u = int(env.users[0])
    paths = []
    for slate in ([0, 1, 2], [7, 8, 9]):
        env.reset(u)
        rng = np.random.default_rng(0)
        path = []
        for t in range(5):
            if env.done(u):
                break
            env.step(u, np.array(slate), t, rng)
            path.append(env.state(u).interest.copy())
        paths.append(path)
    n = min(len(p) for p in paths)
    assert n >= 2
    np.testing.assert_allclose(paths[0][:n], paths[1][:n])
    assert not np.allclose(paths[0][0], env.user_interest0[u])


# ----------------------------------------------------------------------------- dynamics

def test_click_frequencies_and_budget_match_the_model():
    env = sim.LongSessionSimulator(SMALL, click_offset=1.0)
    u = int(env.users[3])
    slate = np.array([4, 9, 2])
    env.reset(u)
    p = env.examination * env.attractiveness(u, 0)[slate]
    exp_r = env.expected_reward(u, slate, 0)
    exp_b = env.expected_budget_change(u, slate, 0)
    assert exp_r == pytest.approx(p.sum())
    rng = np.random.default_rng(0)
    n = 8_000
    clicks = np.zeros((n, 3))
    db = np.zeros(n)
    for j in range(n):
        b0 = env.reset(u).budget
        clicks[j] = env.step(u, slate, 0, rng)
        db[j] = env.state(u).budget - b0
    # the budget moves by exactly the clicked items' return minus the step cost
    np.testing.assert_allclose(db, (clicks > 0) @ env.budget_per_click[slate] - env.config.step_cost,
                               rtol=0, atol=1e-12)
    se = np.sqrt(p * (1 - p) / n)
    assert np.all(np.abs(clicks.mean(axis=0) - p) < 4 * se)
    assert abs(db.mean() - exp_b) < 4 * db.std() / np.sqrt(n)


def test_myopic_optimum_is_the_brute_force_optimum():
    env = sim.LongSessionSimulator(SMALL, n_items=8, n_clusters=3, reward="watch")
    u = int(env.users[0])
    env.reset(u)
    best = max(itertools.permutations(range(8), 3), key=lambda s: env.expected_reward(u, np.array(s)))
    opt = env.optimal_slate(u)
    assert env.expected_reward(u, opt) == pytest.approx(env.expected_reward(u, np.array(best)), abs=1e-12)
    opt2 = env.optimal_slate(u, 3, exclude=opt[:1])
    assert opt[0] not in opt2


def test_satiation_lowers_the_reward_of_repeats_and_wears_off():
    env = sim.LongSessionSimulator(SMALL, drift=0.0, initial_budget=1000.0, max_steps=100)
    u = int(env.users[0])
    env.reset(u)
    slate = env.optimal_slate(u)
    rng = np.random.default_rng(0)
    fresh = env.expected_reward(u, slate, 0)
    for t in range(4):
        env.step(u, slate, t, rng)
    tired = env.expected_reward(u, slate, 4)
    assert tired < 0.7 * fresh
    # the same cluster, other items: lowered too (cluster satiation), less than the repeats
    other = np.flatnonzero((env.item_cluster == env.item_cluster[slate[0]]) & ~np.isin(np.arange(env.n_items), slate))
    a = env.attractiveness(u)
    env_fresh = sim.LongSessionSimulator(SMALL, drift=0.0)
    env_fresh.reset(u)
    assert np.all(a[other] < env_fresh.attractiveness(u)[other])
    assert np.all(a[slate] / env_fresh.attractiveness(u)[slate] < (a[other] / env_fresh.attractiveness(u)[other]).max())
    # it wears off when other clusters are shown
    away = np.flatnonzero(~np.isin(env.item_cluster, env.item_cluster[slate]))[:3]
    for t in range(4, 30):
        env.step(u, away, t, rng)
    assert env.expected_reward(u, slate, 30) == pytest.approx(fresh, rel=0.02)
    # without satiation a repeat keeps its reward
    flat = sim.LongSessionSimulator(SMALL, drift=0.0, satiation_weight=0.0, item_satiation_weight=0.0,
                                    initial_budget=1000.0)
    flat.reset(u)
    for t in range(4):
        flat.step(u, slate, t, rng)
    assert flat.expected_reward(u, slate, 4) == pytest.approx(fresh)


def test_poor_content_ends_sessions_sooner():
    env = sim.LongSessionSimulator(SMALL)
    worst = sim.run_sessions(env, _WorstItems, seed=0)
    myopic = sim.run_sessions(env, bandits.MyopicOracle, seed=0)
    assert worst.mean("steps") < 0.6 * myopic.mean("steps")
    # the budget bounds a session without clicks: initial_budget / step_cost steps
    assert worst.steps.min() >= 1 and (worst.steps <= SMALL.max_steps).all()
    assert myopic.mean() > 3 * worst.mean()
    d, se = myopic.difference(worst, "steps")
    assert d > 4 * se


def test_users_return_for_later_sessions():
    one = sim.run_sessions(sim.LongSessionSimulator(SMALL, max_sessions=3, return_scale=0.0),
                           bandits.MyopicOracle, seed=0)
    assert (one.sessions == 1).all()
    many = sim.run_sessions(sim.LongSessionSimulator(SMALL, max_sessions=3, return_scale=1.0),
                            bandits.MyopicOracle, seed=0)
    assert many.sessions.max() > 1 and many.sessions.max() <= 3
    assert many.mean("steps") > one.mean("steps")
    assert (many.steps <= 3 * SMALL.max_steps).all()


# ----------------------------------------------------------------------------- planning

def test_planning_oracle_beats_the_myopic_oracle():
    diffs = []
    for seed in range(3):
        env = sim.LongSessionSimulator(SMALL, seed=seed)
        myopic = sim.run_sessions(env, bandits.MyopicOracle, seed=seed)
        plan = sim.run_sessions(env, bandits.PlanningOracle, seed=seed)
        diffs.append(plan.reward - myopic.reward)
        # planning keeps the user longer
        assert plan.mean("steps") > myopic.mean("steps")
    d = np.concatenate(diffs)
    se = d.std(ddof=1) / np.sqrt(d.shape[0])
    assert d.mean() > 3 * se
    assert d.mean() > 0.1 * myopic.mean()


def test_planning_oracle_without_lookahead_is_the_myopic_oracle():
    env = sim.LongSessionSimulator(SMALL)
    users = env.users[:8]
    myopic = sim.run_sessions(env, bandits.MyopicOracle, users=users, seed=0)
    rho0 = sim.run_sessions(env, lambda e: bandits.PlanningOracle(e, rhos=(0.0,)), users=users, seed=0)
    np.testing.assert_array_equal(myopic.reward, rho0.reward)
    np.testing.assert_array_equal(myopic.steps, rho0.steps)


# ----------------------------------------------------------------------------- logs

def test_log_propensities_are_the_logging_policys():
    env = sim.LongSessionSimulator(SMALL, n_items=12, n_clusters=3, n_train_users=150)
    logs = env.log_sessions(seed=0, with_features=True)
    assert list(logs.columns) == ["user", "item", "reward", "position", "propensity", "timestamp", "session",
                                  "features"]
    np.testing.assert_allclose(logs["propensity"], 1.0 / env.n_items)
    np.testing.assert_allclose(np.stack(logs["features"].to_numpy()),
                               env.item_features.astype(np.float32)[logs["item"]])
    k = env.slate_size
    steps = logs.groupby(["user", "timestamp"])
    assert (steps["item"].nunique() == k).all()
    assert (steps["position"].apply(lambda p: sorted(p) == list(range(k)))).all()
    # the empirical frequency of each (item, position) is the logged propensity
    n_steps = len(logs) // k
    counts = logs.groupby(["position", "item"]).size().unstack(fill_value=0).to_numpy()
    assert counts.shape == (k, env.n_items)
    p = 1.0 / env.n_items
    z = (counts - n_steps * p) / np.sqrt(n_steps * p * (1 - p))
    assert np.abs(z).max() < 4.5
    # every user was logged until they left, from a fresh start
    first = logs.groupby("user")["timestamp"].min()
    assert (first == 0).all() and set(logs["user"]) == set(env.train_users)
    assert set(logs["reward"].unique()) <= {0.0, 1.0}
    # the logs train the SDK's items side: items_frame indexes every item
    items = env.items_frame()
    assert items.index.tolist() == list(range(env.n_items))
    assert items["features"].iloc[0].shape == (SMALL.dim,)


def test_log_click_rate_matches_random_serving():
    env = sim.LongSessionSimulator(SMALL)
    logs = env.log_sessions(seed=0)
    res = sim.run_sessions(env, _random, users=env.train_users, seed=0)
    per_step_log = logs["reward"].sum() / (len(logs) / env.slate_size)
    per_step_run = res.reward.sum() / res.steps.sum()
    assert per_step_log == pytest.approx(per_step_run, rel=0.25)


# ----------------------------------------------------------------------------- validation

def test_input_validation():
    with pytest.raises(ValueError, match="n_items"):
        sim.LongSessionSimulator(n_items=0)
    with pytest.raises(ValueError, match="slate_size"):
        sim.LongSessionSimulator(n_items=4, n_clusters=2, slate_size=5)
    with pytest.raises(ValueError, match="satiation_decay"):
        sim.LongSessionSimulator(satiation_decay=1.0)
    with pytest.raises(ValueError, match="quality_appeal_corr"):
        sim.LongSessionSimulator(quality_appeal_corr=-1.5)
    with pytest.raises(ValueError, match="initial_budget"):
        sim.LongSessionSimulator(initial_budget=0.0)
    with pytest.raises(ValueError, match="reward"):
        sim.LongSessionSimulator(reward="likes")
    with pytest.raises(ValueError, match="unknown LongSimConfig"):
        sim.LongSessionSimulator(n_itmes=5)
    with pytest.raises(TypeError, match="LongSimConfig"):
        sim.LongSessionSimulator(sim.SimConfig())
    env = sim.LongSessionSimulator(SMALL)
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="unknown user 999"):
        env.reset(999)
    with pytest.raises(TypeError, match="user must be an integer"):
        env.reset("a")
    u = int(env.users[0])
    env.reset(u)
    with pytest.raises(ValueError, match="t=3"):
        env.step(u, np.array([0, 1, 2]), 3, rng)
    with pytest.raises(ValueError, match="duplicate"):
        env.step(u, np.array([0, 0, 2]), 0, rng)
    with pytest.raises(ValueError, match="outside"):
        env.step(u, np.array([0, 1, 60]), 0, rng)
    with pytest.raises(TypeError, match="integers"):
        env.expected_reward(u, np.array([0.5, 1.0]))
    with pytest.raises(ValueError, match="shape"):
        env.expected_reward(u, np.arange(4))
    worst = env.optimal_slate(u)[::-1].copy()
    env.reset(u)
    t = 0
    while not env.done(u):
        env.step(u, np.argsort(env.attractiveness(u))[:3], t, rng)
        t += 1
    with pytest.raises(ValueError, match="has left"):
        env.step(u, worst, t, rng)
    with pytest.raises(ValueError, match="users must be"):
        env.log_sessions(users=[])
    with pytest.raises(TypeError, match="seed"):
        env.log_sessions(seed=1.5)
    with pytest.raises(TypeError, match="reset"):
        sim.run_sessions(sim.UserSimulator(n_items=10, dim=2, n_segments=1, users_per_segment=2), _random)
    with pytest.raises(ValueError, match="k must"):
        sim.run_sessions(env, _random, k=0)
    with pytest.raises(ValueError, match="no users"):
        sim.run_sessions(env, _random, users=[])
    with pytest.raises(RuntimeError, match="max_total_steps=2"):
        sim.run_sessions(env, bandits.MyopicOracle, users=env.users[:1], max_total_steps=2)
    with pytest.raises(ValueError, match="rhos"):
        bandits.PlanningOracle(env, rhos=(-1.0,))
    with pytest.raises(TypeError, match="PlanningOracle"):
        bandits.PlanningOracle(sim.UserSimulator(n_items=10, dim=2, n_segments=1, users_per_segment=2))
    a = sim.run_sessions(env, _random, users=env.users[:3])
    b = sim.run_sessions(env, _random, users=env.users[1:4])
    with pytest.raises(ValueError, match="same users"):
        a.difference(b)
