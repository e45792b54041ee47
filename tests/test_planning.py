"""The world model's uses (issue 15 item 2): planning, in-session adaptation, Dyna rollouts,
the reward model of DM / DR and the learned simulator.

The planning test runs on a world model built by hand to need planning: half the items are
"clickbait" (clicked 82% of the time) whose click all but ends the session, half are
"quality" items (clicked 38%) whose click keeps it going. Served in that model as a learned
simulator (``WorldModelSimulator``), the myopic choice collects about one slate's clicks,
the planner many times more; replacing planning by myopic choice fails the test.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from recmeta_sdk.evaluation import bandits, ope, sim
from recmeta_sdk.model.world import WorldModel
from recmeta_sdk.online.planning import Planner, PlanResult
from recmeta_sdk.training.dyna import model_rollouts

N_ITEMS = 12
BAIT = np.arange(0, N_ITEMS, 2)      # even ids: high appeal, a click ends the session
GOOD = np.arange(1, N_ITEMS, 2)      # odd ids: lower appeal, a click keeps the user


def _tiny_log(seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(6):
        for t in range(4):
            for p, i in enumerate(rng.choice(N_ITEMS, 3, replace=False)):
                rows.append((u, int(i), float(rng.random() < 0.5), p, t, 0))
    return pd.DataFrame(rows, columns=["user", "item", "reward", "position", "timestamp", "session"])


def _built_world(appeal_shift: float = 0.0) -> WorldModel:
    """A 2-d world model set by hand: P(click i) = σ(a_i) whatever the state, the state's first
    coordinate is tanh(Σ clicked quality), and P(end) = σ(-1 - 6 · h'[0])."""
    wm = WorldModel.fit(_tiny_log(), epochs=0, config={"dim": 2, "hidden": 2, "validation": 0.0,
                                                       "calibrate": False, "next_item_weight": 0.0})
    net = wm._net
    dense = wm.item_map.to_index(np.arange(N_ITEMS))
    q = np.where(np.arange(N_ITEMS) % 2 == 0, -1.0, 1.0)
    a = np.where(np.arange(N_ITEMS) % 2 == 0, 1.5 + appeal_shift, -0.5)
    with torch.no_grad():
        for prm in net.parameters():
            prm.zero_()
        net.calib.copy_(torch.tensor([1.0, 0.0]))
        net.item_emb[torch.as_tensor(dense), 0] = torch.as_tensor(q, dtype=torch.float32)
        net.item_bias[torch.as_tensor(dense)] = torch.as_tensor(a, dtype=torch.float32)
        H = 2
        net.gru.bias_ih_l0[H:2 * H] = -20.0           # update gate shut: h' = n
        net.gru.weight_ih_l0[2 * H + 0, 0] = 1.0       # n[0] = tanh(Σ r v[0]) = tanh(Σ clicked quality)
        net.end.weight[0, 0] = -6.0
        net.end.bias[0] = -1.0
    assert wm.has_sessions and wm.n_positions == 3
    return wm


@pytest.fixture(scope="module")
def world() -> WorldModel:
    return _built_world()


def test_built_world_is_what_the_test_says(world):
    h = world.initial_state(1)[0]
    p = world.item_probabilities(h)
    ids = np.asarray(world.item_map.ids)
    assert np.allclose(p[np.isin(ids, BAIT)], 1 / (1 + np.exp(-1.5)), atol=1e-6)
    assert np.allclose(p[np.isin(ids, GOOD)], 1 / (1 + np.exp(0.5)), atol=1e-6)
    # item_probabilities agrees with predict at every position
    slate = np.array([0, 1, 2])
    assert np.allclose(world.predict(h, slate), [world.item_probabilities(h, position=j)[
        world.item_map.to_index(np.array([i]))[0]] for j, i in enumerate(slate)], atol=1e-6)
    bait_click = float(world.end_probability(h, [0, 2, 4], [1, 0, 0]))
    good_click = float(world.end_probability(h, [1, 3, 5], [1, 0, 0]))
    assert bait_click > 0.9 and good_click < 0.01


def test_planning_beats_myopic_choice_on_a_model_that_needs_it(world):
    env = sim.WorldModelSimulator(world, n_users=30, max_steps=15, item_ids=np.arange(N_ITEMS))
    planned = sim.run_sessions(env, lambda e: Planner(world, horizon=4, n_rollouts=2, rhos=(0.0, 1.0), seed=0), seed=0, name="plan")
    myopic = sim.run_sessions(env, lambda e: Planner(world, plan=False), seed=0, name="myopic")
    d, se = planned.difference(myopic)
    assert planned.mean() > 2 * myopic.mean(), (planned.mean(), myopic.mean())
    assert d > 4 * se
    assert planned.mean("steps") > 2 * myopic.mean("steps")


def test_plan_result_prefers_the_items_that_keep_the_user(world):
    pl = Planner(world, horizon=4, n_rollouts=2)
    res = pl.plan("u", 3)
    assert isinstance(res, PlanResult)
    assert set(res.slate.tolist()) <= set(GOOD.tolist())
    assert res.rho > 0 and res.values[0.0] < res.value
    my = Planner(world, plan=False).plan("u", 3)
    assert set(my.slate.tolist()) <= set(BAIT.tolist())
    # exclude is honoured
    res = pl.plan("u", 3, exclude=GOOD[:4])
    assert not set(res.slate.tolist()) & set(GOOD[:4].tolist())


def test_in_session_adaptation_moves_the_slate(world):
    def moved(**kw):
        pl = Planner(world, plan=False, **kw)
        s0 = pl.recommend("u", 3)
        for i in s0:
            pl.feedback("u", i, 0.0)   # misses: the shown items lose evidence
        s1 = pl.recommend("u", 3)
        return len(set(s1.tolist()) - set(s0.tolist()))

    assert moved(evidence=3.0, bandwidth=0.05) > 0
    assert moved(adapt=False, evidence=3.0, bandwidth=0.05) == 0
    assert moved() == 0   # no evidence: this model's responses do not depend on the state


def test_feedback_steps_the_world_state_once_per_slate(world):
    pl = Planner(world, plan=False)
    s = pl.recommend(7, 3)
    h0 = pl.state(7)
    pl.feedback(7, s[0], 1.0)
    assert np.array_equal(pl.state(7), h0)      # waits for the whole slate
    pl.feedback(7, s[1], 0.0)
    pl.feedback(7, s[2], 0.0)
    expected = world.step(h0, s, [1.0, 0.0, 0.0])
    assert np.allclose(pl.state(7), expected, atol=1e-6)
    frozen = Planner(world, plan=False, adapt=False)
    s = frozen.recommend(7, 3)
    for i in s:
        frozen.feedback(7, i, 1.0)
    assert np.array_equal(frozen.state(7), world.initial_state(1)[0])


def test_planner_rejects_bad_input(world):
    with pytest.raises(ValueError, match="horizon"):
        Planner(world, horizon=0)
    with pytest.raises(ValueError, match="rhos"):
        Planner(world, rhos=[-1.0])
    with pytest.raises(ValueError, match="discount"):
        Planner(world, discount=0.0)
    with pytest.raises(ValueError, match="evidence"):
        Planner(world, evidence=-1.0)
    with pytest.raises(TypeError, match="plan"):
        Planner(world, plan=1)
    with pytest.raises(TypeError, match="WorldModel"):
        Planner(object())
    pl = Planner(world)
    with pytest.raises(ValueError, match="unknown item"):
        pl.feedback("u", 999, 1.0)
    with pytest.raises(ValueError, match="finite"):
        pl.feedback("u", 1, float("nan"))
    with pytest.raises(ValueError, match="k must"):
        pl.plan("u", 0)
    with pytest.raises(ValueError, match="trained slate positions"):
        pl.plan("u", 4)
    with pytest.raises(ValueError, match="unknown items"):
        pl.plan("u", 3, exclude=[999])


def test_world_model_simulator_is_seeded_and_checks_its_input(world):
    env = sim.WorldModelSimulator(world, n_users=5, max_steps=10, item_ids=np.arange(N_ITEMS))
    a = sim.run_sessions(env, lambda e: bandits.RandomPolicy(N_ITEMS, seed=1), seed=3)
    b = sim.run_sessions(env, lambda e: bandits.RandomPolicy(N_ITEMS, seed=1), seed=3)
    assert np.array_equal(a.reward, b.reward) and np.array_equal(a.steps, b.steps)
    assert (a.steps >= 1).all() and (a.steps <= 10).all()
    env.reset(0)
    with pytest.raises(ValueError, match="outside"):
        env.step(0, [0, 1, 99], 0, np.random.default_rng(0))
    with pytest.raises(ValueError, match="duplicate"):
        env.step(0, [0, 1, 1], 0, np.random.default_rng(0))
    with pytest.raises(ValueError, match="t=5"):
        env.step(0, [0, 1, 2], 5, np.random.default_rng(0))
    with pytest.raises(ValueError, match="slate_size"):
        sim.WorldModelSimulator(world, slate_size=4)
    with pytest.raises(ValueError, match="does not know"):
        sim.WorldModelSimulator(world, item_ids=[0, 1, 999])
    # histories start users from their adapted states
    env = sim.WorldModelSimulator(world, histories=[([1, 3], [1, 1]), ([], [])], item_ids=np.arange(N_ITEMS))
    assert np.allclose(env.reset(0), world.adapt([1, 3], [1, 1]))
    assert np.allclose(env.reset(1), world.initial_state(1)[0])


def test_world_model_as_the_reward_model_of_dm_and_dr(world):
    log = _tiny_log(seed=1)
    S = world.log_states(log)
    assert S.shape == (len(log), world.hidden)
    first = (log["timestamp"] == 0).to_numpy()
    assert np.allclose(S[first], world.initial_state(1)[0])
    # a later row's state is the roll-in of the user's earlier slates
    u0 = log[log["user"] == 0]
    t1 = u0.index[u0["timestamp"] == 1][0]
    prev = u0[u0["timestamp"] == 0].sort_values("position")
    assert np.allclose(S[t1], world.adapt(prev["item"].to_numpy()[None], prev["reward"].to_numpy()[None]), atol=1e-6)
    q = ope.world_model_q(world, S, items=np.arange(N_ITEMS))
    assert q.shape == (len(log), N_ITEMS, 3)
    pos, act = log["position"].to_numpy(), log["item"].to_numpy()
    target = np.zeros_like(q)
    target[:, GOOD[0], :] = 1.0       # always item 1
    v_hat = ope.expected_reward(q, target, pos)
    assert np.allclose(v_hat, q[np.arange(len(log)), GOOD[0], pos])
    est = ope.dm(log["reward"], v_hat, positions=pos, n_bootstrap=20)
    assert est.value == pytest.approx(float(v_hat.mean()))
    q_hat = ope.logged_reward(q, act, pos)
    prop = np.full(len(log), 1.0 / N_ITEMS)
    est = ope.dr(log["reward"], prop, (act == GOOD[0]).astype(float), q_hat, v_hat, positions=pos, n_bootstrap=20)
    assert np.isfinite(est.value)
    with pytest.raises(ValueError, match="unknown"):
        ope.world_model_q(world, S, items=[999])
    with pytest.raises(ValueError, match="n_positions"):
        ope.world_model_q(world, S, n_positions=4)


def test_dyna_rollouts_are_seeded_and_truncated_where_the_ensemble_disagrees(world):
    same = model_rollouts([world, world], n_users=20, horizon=8, max_disagreement=0.05, seed=0)
    assert same.attrs["truncated"] == 0 and len(same) == 3 * same.attrs["steps"] > 0
    assert list(same.columns) == ["user", "item", "reward", "position", "propensity", "timestamp", "session"]
    assert set(same["reward"].unique()) <= {0.0, 1.0}
    again = model_rollouts([world, world], n_users=20, horizon=8, max_disagreement=0.05, seed=0)
    pd.testing.assert_frame_equal(same, again)
    other = _built_world(appeal_shift=2.0)     # disagrees on the clickbait items
    mixed = model_rollouts([world, other], n_users=20, horizon=8, max_disagreement=0.05, seed=0)
    assert mixed.attrs["truncated"] > 0 and mixed.attrs["steps"] < same.attrs["steps"]
    loose = model_rollouts([world, other], n_users=20, horizon=8, max_disagreement=None, seed=0)
    assert loose.attrs["truncated"] == 0
    numbered = model_rollouts([world, world], n_users=3, horizon=2, max_disagreement=None, seed=0, first_user=100)
    assert set(numbered["user"]) <= {100, 101, 102} and numbered["user"].dtype.kind == "i"
    with pytest.raises(ValueError, match="at least 2"):
        model_rollouts([world], max_disagreement=0.1)
    with pytest.raises(ValueError, match="empty"):
        model_rollouts([])
