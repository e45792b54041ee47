"""Input hardening of the SDK surface (issue 18): every bad value gets a TypeError /
ValueError naming it, or a documented meaning; feedback calls are atomic; the raw-address
embedding-bag fast path is not reachable from the module surface."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import recmeta_sdk as rm
from recmeta_sdk import online, ops
from recmeta_sdk.evaluation import ope

TINY = {"dim": 16, "hidden": 32, "seq_len": 5, "layers": 1, "heads": 2, "epochs": 2, "batch_size": 32,
        "inner_steps": 1}


@pytest.fixture(scope="module")
def model():
    rng = np.random.default_rng(0)
    users = np.repeat(np.arange(40), 6)
    items = rng.integers(0, 30, users.size)
    import pandas as pd

    log = pd.DataFrame({"user": users, "item": items, "reward": rng.integers(0, 2, users.size).astype(float),
                        "timestamp": np.arange(users.size, dtype=float)})
    return rm.train(log, config=TINY, progress=False)


def test_recommend_refuses_a_non_id_with_a_type_error(model):
    for bad in (1.0, None, object(), {"a": 1}):
        with pytest.raises(TypeError, match="users_or_states must be a user id"):
            model.recommend(bad)


def test_recommend_caps_k_at_the_catalogue(model):
    st = model.adapt([1, 2])
    rec = model.recommend(st, k=2**40)
    assert rec.ids.shape == (model.n_items,)
    assert (~rec.valid).sum() == 2  # the two history items are excluded
    rec = model.recommend(st, k=np.int64(2**40), explore="sample", seed=np.uint64(2**64 - 1))
    assert rec.ids.shape == (model.n_items,)
    with pytest.raises(ValueError, match="seed must be in"):
        model.recommend(st, k=3, explore="sample", seed=2**64)
    with pytest.raises(ValueError, match="seed must be in"):
        model.recommend(st, k=3, explore="sample", seed=-1)


def test_adapt_steps_are_bounded(model):
    from recmeta_sdk.api import MAX_ADAPT_STEPS

    model.adapt([1, 2], steps=3)
    with pytest.raises(ValueError, match=f"steps must be <= {MAX_ADAPT_STEPS}"):
        model.adapt([1, 2], steps=10**6)


def test_feedback_position_and_timestamp_are_checked(model):
    st = online.OnlineStore(model)
    with pytest.raises(ValueError, match="position must be an integer; row 1 has 1.5"):
        st.feedback([("n1", 1, 1.0, 0.5, 1.0, 0), ("n1", 2, 1.0, 0.5, 2.0, 1.5)])
    with pytest.raises(TypeError, match="position must be an integer"):
        st.feedback([("n1", 1, 1.0, 0.5, 1.0, True)])
    with pytest.raises(ValueError, match="timestamp must be a finite number; row 0 has 'abc'"):
        st.feedback([("n1", 1, 1.0, 0.5, "abc", 0)])
    with pytest.raises(ValueError, match="timestamp must be a finite number"):
        st.feedback([("n1", 1, 1.0, 0.5, float("inf"), 0)])
    assert st.current("n1") is None and len(st.log()) == 0
    st.feedback([("n1", 1, 1.0, 0.5, 3.0, 2.0), ("n1", 2, 0.0, None, None, None)])  # 2.0: whole number
    assert list(st.log()["position"]) == [2, 0]


def test_feedback_is_atomic_and_refuses_rewards_not_finite_in_float32(model):
    st = online.OnlineStore(model)
    st.feedback([("a", 1, 1.0)])
    before = st.current("a")
    with pytest.raises(ValueError, match=r"reward must be finite \(in float32.*row 2 has 1e\+300"):
        st.feedback([("a", 2, 1.0), ("b", 3, 1.0), ("a", 4, 1e300)])
    assert st.current("a") is before and st.current("b") is None and len(st.log()) == 1
    model.recommend("a" if False else before.state, k=3)  # the user is still served
    # finite in float32 but beyond what a model file holds (LoadLimits.max_abs_weight reward
    # scales; its item bias would overflow float32): refused whole; the bound itself is accepted
    with pytest.raises(ValueError, match=r"reward 3e\+38: at most 1e\+06 reward scales"):
        st.feedback([("a", 2, 3e38)])
    st.feedback([("a", 2, 1e6 * model.reward_scale)])
    assert np.isfinite(st.current("a").state.item_bias).all()


def test_negative_adagrad_state_refused_naming_the_row():
    w = np.zeros((6, 3), np.float32)
    idx, off = np.array([0, 4], np.int64), np.array([0, 2], np.int64)
    g = np.ones((1, 3), np.float32)
    state = np.zeros(6, np.float32)
    state[4] = -1.0
    with pytest.raises(ValueError, match=r"state: negative value -1(\.0)? at row 4 \(a row-wise Adagrad state must be finite and >= 0\)"):
        ops.embedding_bag_backward(w, idx, off, g, optimizer="rowwise_adagrad", state=state)
    state[4] = np.nan
    with pytest.raises(ValueError, match="state: non-finite value nan at row 4"):
        ops.embedding_bag_backward(torch.from_numpy(w), torch.from_numpy(idx), torch.from_numpy(off),
                                   torch.from_numpy(g), optimizer="rowwise_adagrad", state=torch.from_numpy(state))
    assert (w == 0).all()
    state[4] = 0.0
    ops.embedding_bag_backward(w, idx, off, g, optimizer="rowwise_adagrad", state=state)


def test_ope_action_distributions_and_actions_are_checked():
    q = np.random.default_rng(1).random((5, 3))
    good = np.full((5, 3), 1 / 3)
    np.testing.assert_allclose(ope.expected_reward(q, good), q.mean(axis=1))
    with pytest.raises(ValueError, match="round 0 sums to 2"):
        ope.expected_reward(q, good * 2)
    neg = good.copy()
    neg[2] = [1.5, -0.5, 0.0]
    with pytest.raises(ValueError, match=r"-0.5 at \(2, 1\)"):
        ope.expected_reward(q, neg)
    with pytest.raises(ValueError, match="actions must be integers.*0.7 at row 0"):
        ope.logged_reward(q, np.full(5, 0.7))
    with pytest.raises(TypeError, match="actions must be integers"):
        ope.logged_reward(q, np.ones(5, bool))
    np.testing.assert_array_equal(ope.logged_reward(q, np.full(5, 2.0)), q[:, 2])
    np.testing.assert_array_equal(ope.logged_reward(q, np.full(5, 2)), q[:, 2])


def test_embedding_bag_fast_path_takes_no_raw_addresses_from_the_module():
    """The issue's call segfaulted; the raw-address forward is no module function now, and
    the handle is given out once per process (to the SDK's fast path)."""
    _core = pytest.importorskip("recmeta_sdk._core")
    from recmeta_sdk.ops import _embedding_bag as m

    assert not hasattr(_core, "embedding_bag_forward_one")
    if m._init_fast_core() is None:
        pytest.skip("the default CPU backend is not the compiled core (RECMETA_BACKEND set)")
    w = torch.randn(10, 4)
    out = ops.embedding_bag(w, torch.tensor([1, 2]), torch.tensor([0, 2]))  # claims it (fast path)
    torch.testing.assert_close(out, (w[1] + w[2])[None])
    assert m._init_fast_core() is not None  # the SDK keeps its handle
    with pytest.raises(RuntimeError, match="already claimed"):
        _core._claim_embedding_bag_fast_forward()


def test_recommend_names_a_popularity_penalty_that_overflows(model):
    u = int(model.user_ids[0])
    with pytest.raises(ValueError, match=r"popularity_penalty=1e\+300"):
        model.recommend(u, k=3, popularity_penalty=1e300)
    # a large but representable penalty still ranks (the least popular first)
    rec = model.recommend(u, k=3, popularity_penalty=1e6)
    assert rec.valid.all() and np.isfinite(rec.scores).all()


def test_wide_recency_without_its_decay_is_refused_up_front():
    import pandas as pd

    rng = np.random.default_rng(1)
    log = pd.DataFrame({"user": rng.integers(0, 30, 300), "item": rng.integers(0, 20, 300)})
    with pytest.raises(ValueError, match="wide_recency_decay"):
        rm.train(log, config=dict(TINY, wide_recency=0.5), progress=False)
    m = rm.train(log, config=dict(TINY, wide_recency=0.5, wide_recency_decay=0.1), progress=False)
    assert m.recommend(int(m.user_ids[0]), k=3).valid.all()
