"""Off-policy estimators: hand-computed cases, validation, bootstrap, and the OBD sample."""
import numpy as np
import pytest

from recmeta_sdk.evaluation import ope

# A hand-computed case. w = action_prob / propensities = [2, 2, 0.5, 0.5].
R = np.array([1.0, 0.0, 1.0, 1.0])
P = np.array([0.5, 0.25, 0.5, 1.0])
PI = np.array([1.0, 0.5, 0.25, 0.5])
Q = np.array([0.5, 0.5, 0.5, 0.5])
V = np.array([0.4, 0.4, 0.6, 0.6])


def test_hand_computed_values():
    # ips: mean([2, 0, .5, .5]) = .75
    assert ope.ips(R, P, PI, n_bootstrap=10).value == pytest.approx(0.75, abs=1e-12)
    # snips: (2 + 0 + .5 + .5) / (2 + 2 + .5 + .5) = 3 / 5
    assert ope.snips(R, P, PI, n_bootstrap=10).value == pytest.approx(0.6, abs=1e-12)
    # dm: mean(v) = .5
    assert ope.dm(R, V, n_bootstrap=10).value == pytest.approx(0.5, abs=1e-12)
    # dr: mean([.4 + 1, .4 - 1, .6 + .25, .6 + .25]) = 2.5 / 4
    assert ope.dr(R, P, PI, Q, V, n_bootstrap=10).value == pytest.approx(0.625, abs=1e-12)
    # sndr: .5 + (1 - 1 + .25 + .25) / 5 = .6
    assert ope.sndr(R, P, PI, Q, V, n_bootstrap=10).value == pytest.approx(0.6, abs=1e-12)


def test_dr_equals_ips_with_zero_model_and_dm_with_perfect_model():
    rng = np.random.default_rng(3)
    n = 101
    p = rng.uniform(0.05, 1.0, n)
    pi = rng.uniform(0.0, 1.0, n)
    r = rng.binomial(1, 0.3, n).astype(float)
    zero = np.zeros(n)
    assert ope.dr(r, p, pi, zero, zero, n_bootstrap=5).value == pytest.approx(
        ope.ips(r, p, pi, n_bootstrap=5).value, rel=1e-12)
    v = rng.uniform(0, 1, n)
    # a model that predicts the observed reward exactly: the correction vanishes
    assert ope.dr(r, p, pi, r, v, n_bootstrap=5).value == pytest.approx(v.mean(), rel=1e-12)
    assert ope.sndr(r, p, pi, r, v, n_bootstrap=5).value == pytest.approx(v.mean(), rel=1e-12)


def test_on_policy_ips_is_the_sample_mean_and_ci_covers_it():
    rng = np.random.default_rng(11)
    n = 997
    p = rng.uniform(0.01, 1.0, n)
    r = rng.binomial(1, 0.2, n).astype(float)
    est = ope.ips(r, p, p, n_bootstrap=300, random_state=5)
    assert est.value == pytest.approx(r.mean(), abs=1e-12)
    assert est.ci_low < est.value < est.ci_high
    se = r.std() / np.sqrt(n)
    # a 95% percentile interval of a mean is close to +-1.96 standard errors
    assert est.ci_high - est.ci_low == pytest.approx(2 * 1.96 * se, rel=0.2)


def test_bootstrap_seeded_and_constant_data_has_zero_width():
    rng = np.random.default_rng(1)
    n = 211
    p = rng.uniform(0.1, 1.0, n)
    pi = rng.uniform(0, 1, n)
    r = rng.binomial(1, 0.5, n).astype(float)
    a = ope.snips(r, p, pi, n_bootstrap=200, random_state=7)
    b = ope.snips(r, p, pi, n_bootstrap=200, random_state=7)
    c = ope.snips(r, p, pi, n_bootstrap=200, random_state=8)
    assert (a.ci_low, a.ci_high) == (b.ci_low, b.ci_high)
    assert (a.ci_low, a.ci_high) != (c.ci_low, c.ci_high)
    const = ope.ips(np.ones(n), np.full(n, 0.5), np.full(n, 0.25), n_bootstrap=50)
    assert const.value == const.ci_low == const.ci_high == pytest.approx(0.5)
    assert const.n == n


def test_positions_give_per_position_estimates():
    r = np.array([1.0, 0.0, 1.0, 0.0, 1.0, 1.0])
    p = np.array([0.5, 0.5, 0.25, 0.25, 0.5, 1.0])
    pi = np.array([0.5, 1.0, 0.5, 0.0, 0.25, 0.5])
    pos = np.array([0, 0, 1, 1, 2, 2])
    est = ope.ips(r, p, pi, positions=pos, n_bootstrap=20)
    w = pi / p  # [1, 2, 2, 0, .5, .5]
    assert est.value == pytest.approx((w * r).mean())
    assert est.by_position[0].value == pytest.approx(0.5)      # (1 + 0) / 2
    assert est.by_position[1].value == pytest.approx(1.0)      # (2 + 0) / 2
    assert est.by_position[2].value == pytest.approx(0.5)      # (.5 + .5) / 2
    # balanced positions: the overall value is the plain average of the per-position ones
    assert est.value == pytest.approx(np.mean([e.value for e in est.by_position.values()]))
    sn = ope.snips(r, p, pi, positions=pos, n_bootstrap=20)
    assert sn.by_position[1].value == pytest.approx(2.0 / 2.0)  # (2*1 + 0) / (2 + 0)
    assert sn.value == pytest.approx((w * r).sum() / w.sum())


@pytest.mark.parametrize("field,bad,row,msg", [
    ("propensities", [0.5, 0.5, 0.0, 0.5], 2, "propensities"),
    ("propensities", [0.5, 1.5, 0.5, 0.5], 1, "propensities"),
    ("propensities", [0.5, 0.5, 0.5, np.nan], 3, "propensities"),
    ("action_prob", [0.5, -0.1, 0.5, 0.5], 1, "action_prob"),
    ("rewards", [1.0, np.inf, 0.0, 0.0], 1, "rewards"),
    ("q_hat", [0.1, 0.1, np.nan, 0.1], 2, "q_hat"),
    ("v_hat", [np.nan, 0.1, 0.1, 0.1], 0, "v_hat"),
])
def test_validation_names_field_and_row(field, bad, row, msg):
    kw = dict(rewards=R, propensities=P, action_prob=PI, q_hat=Q, v_hat=V)
    kw[field] = np.array(bad)
    with pytest.raises(ValueError, match=rf"{msg}.*row {row}\b"):
        ope.dr(**kw, n_bootstrap=5)


def test_validation_lengths_and_options():
    with pytest.raises(ValueError, match="propensities has length 3"):
        ope.ips(R, P[:3], PI)
    with pytest.raises(ValueError, match="action_prob has length 5"):
        ope.snips(R, P, np.append(PI, 0.1))
    with pytest.raises(ValueError, match="positions"):
        ope.ips(R, P, PI, positions=[0, 1])
    with pytest.raises(ValueError, match="n_bootstrap"):
        ope.ips(R, P, PI, n_bootstrap=0)
    with pytest.raises(ValueError, match="alpha"):
        ope.ips(R, P, PI, alpha=1.5)
    with pytest.raises(ValueError, match="empty"):
        ope.ips([], [], [])


def test_full_table_helpers():
    q = np.array([[[0.1, 0.2], [0.3, 0.4]], [[0.5, 0.6], [0.7, 0.8]]])  # (n=2, A=2, P=2)
    pi = np.array([[[0.25, 1.0], [0.75, 0.0]], [[0.5, 0.0], [0.5, 1.0]]])
    pos = np.array([1, 0])
    v = ope.expected_reward(q, pi, pos)
    assert v == pytest.approx([1.0 * 0.2 + 0.0 * 0.4, 0.5 * 0.5 + 0.5 * 0.7])
    assert ope.logged_reward(q, [1, 0], pos) == pytest.approx([0.4, 0.5])
    assert ope.expected_reward(q[:, :, 0], pi[:, :, 0]) == pytest.approx([0.25 * 0.1 + 0.75 * 0.3, 0.6])
    with pytest.raises(ValueError, match="positions"):
        ope.expected_reward(q, pi)


def test_click_rate_model_and_cross_fitting():
    a = np.array([0, 0, 1, 1, 1, 2])
    pos = np.array([0, 0, 0, 1, 1, 0])
    r = np.array([1.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    m = ope.ClickRateModel(3, 2, prior_strength=0.0).fit(a, pos, r)
    assert m.table_[0, 0] == pytest.approx(0.5)
    assert m.table_[1, 1] == pytest.approx(0.5)
    assert m.table_[1, 0] == pytest.approx(1.0)
    assert m.table_[2, 0] == pytest.approx(0.0)
    m2 = ope.ClickRateModel(3, 2, prior_strength=2.0).fit(a, pos, r)
    g = r.mean()
    assert m2.table_[0, 1] == pytest.approx(g)  # never shown: the global rate
    assert m2.table_[0, 0] == pytest.approx((1 + 2 * g) / (2 + 2))
    cf = ope.ClickRateModel(3, 2, prior_strength=1.0).fit_predict(a, pos, r, n_folds=2, random_state=0)
    assert cf.shape == (6, 3, 2)
    with pytest.raises(ValueError, match="actions"):
        ope.ClickRateModel(2, 2).fit(a, pos, r)


def test_bernoulli_ts_action_dist_matches_exact_probabilities():
    # two arms, Beta(2, 1) vs Beta(1, 1): P(arm 0 ranked first) = E[theta_0] = 2/3
    d = ope.bernoulli_ts_action_dist([2.0, 1.0], [1.0, 1.0], 2, n_sim=60_000, random_state=0)
    assert d[0, 0] == pytest.approx(2 / 3, abs=0.01)
    assert d[:, 0].sum() == pytest.approx(1.0) and d[:, 1].sum() == pytest.approx(1.0)
    assert d[0, 1] == pytest.approx(d[1, 0])
    # an arm with an overwhelming prior is always first
    d3 = ope.bernoulli_ts_action_dist([1e6, 1.0, 1.0], [1.0, 1e6, 1e6], 1, n_sim=1000, random_state=1)
    assert d3[0, 0] == 1.0


# ----------------------------------------------------------------------------- OBD sample

@pytest.fixture(scope="module")
def obd_logs():
    from recmeta_sdk import datasets

    out = {}
    for campaign in ("all", "men", "women"):
        for policy in ("random", "bts"):
            out[campaign, policy] = datasets.load("obd", campaign=campaign, policy=policy)
    return out


# on-policy click rates measured with the Open Bandit Pipeline on the same sample (quality.md)
OBD_ON_POLICY = {("all", "random"): 0.0038, ("all", "bts"): 0.0042,
                 ("men", "random"): 0.0046, ("men", "bts"): 0.0069,
                 ("women", "random"): 0.0046, ("women", "bts"): 0.0046}


@pytest.mark.parametrize("key", sorted(OBD_ON_POLICY))
def test_obd_ips_on_own_logs_reproduces_on_policy_ctr(obd_logs, key):
    df = obd_logs[key].interactions
    r = df["reward"].to_numpy(float)
    p = df["propensity"].to_numpy(float)
    pos = df["position"].to_numpy() - 1
    est = ope.ips(r, p, p, positions=pos, n_bootstrap=200, random_state=0)
    assert est.value == r.mean()                       # exactly the on-policy click rate
    assert est.value == pytest.approx(OBD_ON_POLICY[key], abs=5e-6)
    assert est.ci_low < est.value < est.ci_high
    assert sorted(est.by_position) == [0, 1, 2]
    for p_, e in est.by_position.items():
        assert e.value == pytest.approx(r[pos == p_].mean(), abs=1e-15)
