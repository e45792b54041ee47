"""Exploration that can be audited: sampled and epsilon-greedy slates, their propensities
against empirical frequencies, determinism, and logged propensities feeding ope.ips."""
from collections import Counter

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

import recmeta_sdk as rm
from recmeta_sdk import online
from recmeta_sdk.evaluation import ope
from recmeta_sdk.evaluation import sim

TINY = {"dim": 16, "hidden": 32, "seq_len": 5, "layers": 1, "heads": 2, "epochs": 4, "batch_size": 32,
        "lr": 0.01, "inner_steps": 1}
CANDS = [2, 5, 11, 13, 17, 23]  # a small candidate set: every ranked slate has a sizeable probability


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model():
    rng = np.random.default_rng(0)
    rows = []
    for u in range(60):
        seg = u % 3
        for t, i in enumerate(rng.choice(np.arange(seg * 10, seg * 10 + 10), size=6, replace=False)):
            rows.append((f"u{u}", int(i), t))
    return rm.train(pd.DataFrame(rows, columns=["user", "item", "timestamp"]), config=TINY, progress=False)


@pytest.fixture(scope="module")
def state(model):
    return model.adapt([11, 13])


def _chi2(counts: Counter, probs: dict, n: int) -> float:
    """Pearson chi-square p-value, pooling cells with an expected count below 5."""
    obs, exp, pool_o, pool_e = [], [], 0.0, 0.0
    for key, p in probs.items():
        if n * p < 5:
            pool_o += counts.get(key, 0)
            pool_e += n * p
        else:
            obs.append(counts.get(key, 0))
            exp.append(n * p)
    if pool_e > 0:
        obs.append(pool_o)
        exp.append(pool_e)
    assert sum(counts.values()) == n and set(counts) <= set(probs)  # nothing outside the support
    assert abs(sum(exp) - n) < 1e-5 * n  # the probabilities (float32 propensities) sum to one
    exp = np.asarray(exp) * (n / sum(exp))
    return float(stats.chisquare(obs, exp).pvalue)


def _temper(model, state, tau=1.0):
    return dict(candidates=CANDS, exclude_seen=False, temperature=tau)


def test_sample_same_seed_same_slate(model, state):
    kw = _temper(model, state)
    a = model.recommend(state, 3, explore="sample", seed=7, **kw)
    b = model.recommend(state, 3, explore="sample", seed=7, **kw)
    assert np.array_equal(a.ids, b.ids) and np.array_equal(a.propensities, b.propensities)
    slates = {tuple(model.recommend(state, 3, explore="sample", seed=s, **kw).ids) for s in range(30)}
    assert len(slates) > 5  # the seed matters
    e1 = online.epsilon_slate(model, state, 3, epsilon=0.5, seed=7, **kw)
    e2 = online.epsilon_slate(model, state, 3, epsilon=0.5, seed=7, **kw)
    assert np.array_equal(e1.ids, e2.ids) and np.array_equal(e1.propensities, e2.propensities)
    assert len({tuple(online.epsilon_slate(model, state, 3, epsilon=0.5, seed=s, **kw).ids)
                for s in range(30)}) > 5


def test_sampled_item_propensities_are_the_policy(model, state):
    kw = _temper(model, state)
    full = model.recommend(state, len(CANDS), explore="sample", seed=1, **kw)
    # all candidates drawn: their pi(a|s) sum to one and equal softmax of the reported scores
    np.testing.assert_allclose(full.propensities.sum(), 1.0, rtol=1e-5)
    sm = torch.softmax(torch.from_numpy(full.scores.astype(np.float64)), 0).numpy()
    np.testing.assert_allclose(full.propensities, sm, rtol=1e-5)
    assert online.slate_propensity(full.propensities) > 0


def test_sampled_slate_propensities_match_frequencies(model, state):
    kw = _temper(model, state)
    n = 3000
    counts, first = Counter(), Counter()
    probs = {}
    for s in range(n):
        r = model.recommend(state, 2, explore="sample", seed=s, **kw)
        key = tuple(int(x) for x in r.ids)
        counts[key] += 1
        first[key[0]] += 1
        probs[key] = float(online.slate_propensity(r.propensities))  # the same slate gives the same value
    # every ranked pair of candidates, its Plackett-Luce probability from the item propensities
    full = model.recommend(state, len(CANDS), explore="sample", seed=0, **kw)
    pi = dict(zip(full.ids.tolist(), full.propensities.astype(np.float64).tolist()))
    all_pairs = {(a, b): pi[a] * pi[b] / (1 - pi[a]) for a in CANDS for b in CANDS if a != b}
    for key, p in probs.items():
        assert abs(p - all_pairs[key]) < 1e-5
    np.testing.assert_allclose(sum(all_pairs.values()), 1.0, rtol=1e-6)
    p_pairs = _chi2(counts, all_pairs, n)
    p_first = _chi2(first, pi, n)
    assert p_pairs > 1e-3 and p_first > 1e-3, (p_pairs, p_first)
    # and the test has power: a wrong model of the slate (uniform) is rejected
    uniform = {k: 1.0 / len(all_pairs) for k in all_pairs}
    assert _chi2(counts, uniform, n) < 1e-6


def test_epsilon_slate_propensities_match_frequencies(model, state):
    kw = _temper(model, state)
    eps, n = 0.4, 3000
    greedy = model.recommend(state, len(CANDS), **kw).ids.tolist()
    counts, probs = Counter(), {}
    for s in range(n):
        r = online.epsilon_slate(model, state, 2, epsilon=eps, seed=s, **kw)
        key = tuple(int(x) for x in r.ids)
        counts[key] += 1
        probs[key] = float(online.slate_propensity(r.propensities, "epsilon"))
    # the exact distribution of epsilon-greedy pairs, computed independently
    m = len(CANDS)
    exact = {}
    for a in CANDS:
        pa = (1 - eps) * (a == greedy[0]) + eps / m
        best_b = greedy[1] if a == greedy[0] else greedy[0]
        for b in CANDS:
            if b != a:
                exact[(a, b)] = pa * ((1 - eps) * (b == best_b) + eps / (m - 1))
    for key, p in probs.items():
        assert abs(p - exact[key]) < 1e-6, (key, p, exact[key])
    assert _chi2(counts, exact, n) > 1e-3


def test_epsilon_extremes_and_errors(model, state):
    kw = _temper(model, state)
    greedy = model.recommend(state, 3, **kw)
    g = online.epsilon_slate(model, state, 3, epsilon=0.0, seed=3, **kw)
    assert np.array_equal(g.ids, greedy.ids) and np.array_equal(g.propensities, np.ones(3, np.float32))
    u = online.epsilon_slate(model, state, 3, epsilon=1.0, seed=3, **kw)
    np.testing.assert_allclose(u.propensities, [1 / 6, 1 / 5, 1 / 4], rtol=1e-6)
    big = online.epsilon_slate(model, state, 8, epsilon=0.2, seed=3, **kw)  # more than eligible
    assert big.valid.sum() == 6 and (big.ids[~big.valid] == -1).all() and (big.propensities[~big.valid] == 0).all()
    for bad in (-0.1, 1.5, "x"):
        with pytest.raises(ValueError, match="epsilon"):
            online.epsilon_slate(model, state, 3, epsilon=bad, seed=1)
    with pytest.raises(ValueError, match="seed"):
        online.epsilon_slate(model, state, 3, epsilon=0.1, seed=None)
    with pytest.raises(ValueError, match="propensities"):
        online.slate_propensity([0.5, 1.5])


def test_logged_propensities_feed_ips(model):
    """Serve new simulator users with explore="sample" (one item per round, feedback after
    each), log (reward, propensity); IPS of the same policy on its own logs is the
    on-policy mean reward: exactly with action_prob = the logged propensity, and to float
    precision with the target probabilities recomputed from the served state."""
    env = sim.UserSimulator(n_items=30, dim=4, n_segments=3, n_test_segments=2, users_per_segment=5,
                            slate_size=1, position_bias=0.0, drift=0.0, seed=3)
    logs = env.log_random(n_rounds=10, seed=0)
    m = rm.train(logs[logs["reward"] > 0][["user", "item", "timestamp"]].assign(user=lambda d: d["user"]),
                 items=pd.DataFrame(index=pd.Index(np.arange(env.n_items), name="item")),
                 config={**TINY, "epochs": 2}, progress=False)
    st = online.OnlineStore(m)
    rewards, props, recomputed = [], [], []
    for j, u in enumerate(env.users):
        rng = np.random.default_rng([0, j])
        for t in range(8):
            cur = st.current(int(u))
            state = cur.state if cur is not None else m.adapt([])
            r = m.recommend(state, 1, explore="sample", seed=1000 * j + t)
            item = int(r.ids[0])
            rew = float(env.step(u, np.array([item]), t, rng)[0])
            st.feedback([(int(u), item, rew, float(r.propensities[0]), float(t), 0)])
            # the target policy's probability of the logged action, from the state served
            allsc = m.recommend(state, m.n_items)
            sc = allsc.scores[allsc.valid].astype(np.float64)
            p = np.exp(sc - sc.max())
            p /= p.sum()
            recomputed.append(float(p[list(allsc.ids[allsc.valid]).index(item)]))
            rewards.append(rew)
            props.append(float(r.propensities[0]))
    rewards, props = np.asarray(rewards), np.asarray(props)
    log = st.log()
    np.testing.assert_array_equal(log["propensity"].to_numpy(), props.astype(np.float32).astype(np.float64))
    assert rewards.sum() > 0
    est = ope.ips(rewards, log["propensity"].to_numpy(), log["propensity"].to_numpy(), n_bootstrap=200)
    assert est.value == rewards.mean()
    est2 = ope.ips(rewards, log["propensity"].to_numpy(), np.asarray(recomputed), n_bootstrap=200)
    np.testing.assert_allclose(est2.value, rewards.mean(), rtol=1e-5)
    np.testing.assert_allclose(recomputed, props, rtol=1e-5)
    assert est2.ci_low <= rewards.mean() <= est2.ci_high
