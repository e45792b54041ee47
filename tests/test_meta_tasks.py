"""Meta-learning across group tasks (segments, categories, campaigns): recmeta_sdk.training.meta_tasks."""
import numpy as np
import pandas as pd
import pytest
import torch

import recmeta_sdk as rm
from recmeta_sdk.evaluation.metrics import ranking_metrics
from recmeta_sdk.training.meta_tasks import TaskSpec, TaskState, parse_tasks
from recmeta_sdk.model import Config, ItemFeatures, RecMetaNet

TRAIN_CAMPAIGNS = [f"c{c}" for c in range(6)]
HELD_OUT = ["c6", "c7"]


def campaigns(seed=0, n_items=120, n_genres=10, n_users=600, n_train=6, n_test=2, per_user=3, n_per=8,
              a=1.0, b=3.0):
    """Users act in several campaigns; each campaign prefers two item genres (logit +b) on top
    of the user's own genre tastes (a * N(0, 1) per genre). Half the users also act in one of
    the held-out campaigns (c6, c7), whose preferred genres differ from the training ones'.
    A user's items are distinct across campaigns. Returns (log, items with a genre column)."""
    rng = np.random.default_rng(seed)
    genre = rng.integers(n_genres, size=n_items)
    U = rng.normal(size=(n_users, n_genres))
    pref = [rng.choice(n_genres, 2, replace=False) for _ in range(n_train + n_test)]
    rows, t = [], 0
    for u in range(n_users):
        camps = list(rng.choice(n_train, per_user, replace=False))
        if u >= n_users // 2:
            camps.append(n_train + u % n_test)
        avail = np.ones(n_items, bool)
        for c in camps:
            logit = a * U[u, genre] + b * np.isin(genre, pref[c])
            logit[~avail] = -np.inf
            p = np.exp(logit - logit[avail].max())
            p /= p.sum()
            for i in rng.choice(n_items, n_per, replace=False, p=p):
                avail[i] = False
                rows.append((u, int(i), t, f"c{c}"))
                t += 1
    df = pd.DataFrame(rows, columns=["user", "item", "timestamp", "campaign"])
    items = pd.DataFrame({"genre": [f"g{g}" for g in genre]}, index=pd.Index(np.arange(n_items), name="item"))
    return df, items


CFG = {"dim": 32, "hidden": 64, "epochs": 10, "seq_len": 10, "lr": 0.01, "inner_lr": 5.0}


def held_out_recall(model, df, task_of=None, **kw):
    """Mean Recall@10 over the held-out campaigns of their query users (the users after the
    first 40 of each campaign; their states read their training history), serving
    ``model.recommend(users, task=task_of(support))`` (support: the first 40 users' rows,
    320 interactions) or, with ``task_of=None``, without a task."""
    out = []
    for c in HELD_OUT:
        rows = df[df.campaign == c]
        us = rows.user.unique()
        support, q_users = rows[rows.user.isin(us[:40])], us[40:]
        task = None if task_of is None else task_of(support)
        recs = model.recommend(list(q_users), k=10, task=task, **kw)
        top = model.item_map.to_index(recs.ids.ravel()).reshape(recs.ids.shape)
        truth = [set(model.item_map.to_index(rows.item[rows.user == u])) for u in q_users]
        out.append(ranking_metrics(top, truth, 10)["recall@10"])
    return float(np.mean(out))


def no_task_recall(model, df):
    """The best of serving without a task: default per-user steps, or none."""
    out = []
    for steps in (None, 0):
        r = []
        for c in HELD_OUT:
            rows = df[df.campaign == c]
            q_users = rows.user.unique()[40:]
            sts = [model.user_state(u, steps=steps) for u in q_users]
            recs = model.recommend(sts, k=10)
            top = model.item_map.to_index(recs.ids.ravel()).reshape(recs.ids.shape)
            truth = [set(model.item_map.to_index(rows.item[rows.user == u])) for u in q_users]
            r.append(ranking_metrics(top, truth, 10)["recall@10"])
        out.append(float(np.mean(r)))
    return max(out)


def meta_experiment(seed):
    df, items = campaigns(seed)
    train = df[df.campaign.isin(TRAIN_CAMPAIGNS)]
    meta = rm.train(train, items=items, config=dict(CFG, seed=seed), tasks="campaign", progress=False)
    plain = rm.train(train, items=items, config=dict(CFG, seed=seed, meta="none"), tasks="campaign",
                     progress=False)
    return {
        "meta+adapt_task": held_out_recall(meta, df, meta.adapt_task),
        "meta, no task": no_task_recall(meta, df),
        "none+adapt_task": held_out_recall(plain, df, plain.adapt_task),
        "none, no task": no_task_recall(plain, df),
    }


@pytest.mark.usefixtures("one_torch_thread")
def test_adapting_to_a_held_out_campaign_helps_and_meta_training_makes_it_work():
    # measured on seeds 0-4 (Recall@10): meta+adapt_task 0.31 / 0.34 / 0.24 / 0.34 / 0.35;
    # the best of the three others 0.11 / 0.15 / 0.14 / 0.24 / 0.26: gaps 0.20 / 0.19 / 0.10 /
    # 0.11 / 0.10. The asserted margin (0.05) is half the smallest gap seen.
    r = meta_experiment(0)
    others = max(r["meta, no task"], r["none+adapt_task"], r["none, no task"])
    assert r["meta+adapt_task"] > others + 0.05, r


# ---------------------------------------------------------------------------- validation

def test_parse_tasks_forms():
    assert parse_tasks("user") == TaskSpec("user", None)
    assert parse_tasks("segment:age_bucket") == TaskSpec("segment", "age_bucket")
    assert parse_tasks(("category", "genre")) == TaskSpec("category", "genre")
    assert parse_tasks("campaign") == TaskSpec("campaign", "campaign")
    assert parse_tasks("campaign:promo") == TaskSpec("campaign", "promo")
    spec = parse_tasks({"by": "segment", "column": "age", "users_per_task": 8, "tasks_per_batch": 3,
                        "support_frac": 0.25})
    assert spec == TaskSpec("segment", "age", 8, 3, 0.25)
    assert parse_tasks(spec) == spec


@pytest.mark.parametrize("bad, match", [
    ("users", "unknown task kind 'users'"),
    ("segment", "needs the user feature column"),
    (("category",), r"\(kind, column\)"),
    ("category:", "empty column"),
    ("user:age", "take no column"),
    ({"column": "age"}, "needs 'by'"),
    ({"by": "campaign", "users": 3}, "unknown tasks options"),
    ({"by": "campaign", "users_per_task": 1}, "users_per_task"),
    ({"by": "campaign", "support_frac": 1.0}, "support_frac"),
])
def test_parse_tasks_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        parse_tasks(bad)
    with pytest.raises(TypeError, match="tasks must be"):
        parse_tasks(3)


@pytest.fixture(scope="module")
def small():
    df, items = campaigns(1, n_users=120, n_train=3, n_test=1)
    users = pd.DataFrame({"age": np.where(np.arange(120) % 3 == 0, "young", "old")},
                         index=pd.Index(np.arange(120), name="user"))
    return df[df.campaign != "c3"], items, users


TINY = {"dim": 16, "hidden": 16, "epochs": 2, "seq_len": 5, "seed": 5}


def test_train_task_errors_name_the_problem(small):
    df, items, _ = small
    with pytest.raises(ValueError, match="unknown task kind 'campain'"):
        rm.train(df, config=TINY, tasks="campain")
    with pytest.raises(ValueError, match="needs the item feature column"):
        rm.train(df, config=TINY, tasks="category")
    with pytest.raises(ValueError, match="'genres' is neither in the interactions nor in items"):
        rm.train(df, items=items, config=TINY, tasks="category:genres")
    with pytest.raises(ValueError, match="'age' is neither in the interactions nor in users"):
        rm.train(df, config=TINY, tasks="segment:age")
    with pytest.raises(ValueError, match="needs the column 'campaign'"):
        rm.train(df.drop(columns="campaign"), config=TINY, tasks="campaign")
    with pytest.raises(ValueError, match="gives 1 task"):  # one campaign: nothing to meta-learn across
        rm.train(df[df.campaign == "c0"], config=TINY, tasks="campaign")
    with pytest.raises(ValueError, match="calib_users"):
        rm.train(df, config=dict(TINY, calib_users=0.2), tasks="campaign")


@pytest.mark.usefixtures("one_torch_thread")
def test_segment_and_category_tasks_train_and_serve(small):
    df, items, users = small
    for tasks in ("segment:age", ("category", "genre")):
        m = rm.train(df, users=users, items=items, config=TINY, tasks=tasks, progress=False)
        ts = m.adapt_task(df[df.campaign == "c1"].iloc[:100])
        r = m.recommend([0, 1], k=5, task=ts)
        assert r.ids.shape == (2, 5) and r.valid.all()


def _saved(model, tmp_path):
    path = str(tmp_path / "m.recmeta")
    model.save(path)
    return path


@pytest.mark.usefixtures("one_torch_thread")
def test_task_training_and_adapt_task_are_reproducible_and_pure(small, tmp_path):
    df, items, _ = small
    a = rm.train(df, items=items, config=TINY, tasks="campaign", progress=False)
    b = rm.train(df, items=items, config=TINY, tasks="campaign", progress=False)
    c = rm.train(df, items=items, config=dict(TINY, seed=6), tasks="campaign", progress=False)
    sa, sb, sc = (m._net.state_dict() for m in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    before = {k: v.clone() for k, v in sa.items()}
    frame = df[df.campaign == "c2"].iloc[:150].copy()
    frame.loc[frame.index[:8], "user"] = 10_000 + np.arange(8)  # new users: states from these rows only
    t1, t2 = a.adapt_task(frame), a.adapt_task(frame)
    assert isinstance(t1, TaskState) and t1.n_new_users == 8 and t1.n_interactions == 150
    np.testing.assert_array_equal(t1.gamma, t2.gamma)
    np.testing.assert_array_equal(t1.delta, t2.delta)
    assert all(torch.equal(before[k], v) for k, v in a._net.state_dict().items())
    back = rm.load(_saved(a, tmp_path))  # the model saves as before; a TaskState is recomputed
    t3 = back.adapt_task(frame)
    np.testing.assert_array_equal(t1.delta, t3.delta)
    np.testing.assert_array_equal(back.recommend([3, 4], k=5, task=t3).ids, a.recommend([3, 4], k=5, task=t1).ids)
    # the task's phi is what serves: 0 steps is the initial phi, adapted ones move the ranking
    t0 = a.adapt_task(frame, steps=0)
    np.testing.assert_array_equal(a.user_state(3, task=t0).vector, a.user_state(3, steps=0).vector)
    assert not np.array_equal(a.user_state(3, task=t1).vector, a.user_state(3, steps=0).vector)
    np.testing.assert_array_equal(a.recommend(3, k=5, task=t1).ids,
                                  a.recommend(a.user_state(3, task=t1), k=5).ids)
    hist = list(df.item[df.user == 3])
    np.testing.assert_allclose(a.adapt(hist, task=t1).vector, a.user_state(3, task=t1).vector, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="unknown to the model"):
        a.adapt_task(pd.DataFrame({"user": [1], "item": [99_999]}))
    with pytest.raises(ValueError, match="'user' column"):
        a.adapt_task(pd.DataFrame({"item": [1]}))
    with pytest.raises(TypeError, match="TaskState"):
        a.recommend(3, task="c2")
    with pytest.raises(ValueError, match="cannot be combined"):
        a.recommend(3, task=t1, explore="epsilon", seed=0)


@pytest.mark.usefixtures("one_torch_thread")
def test_user_tasks_path_is_unchanged_by_the_group_hooks():
    """tasks="user" (the default, spelled out or not) trains the per-user path, and starting the
    per-user adaptation from init = the initial phi is the same computation as without it."""
    df, items = campaigns(2, n_users=60, n_train=3, n_test=1, per_user=2)
    m = rm.train(df, items=items, config=TINY, progress=False)
    m2 = rm.train(df, items=items, config=TINY, tasks="user", progress=False)
    assert all(torch.equal(v, m2._net.state_dict()[k]) for k, v in m._net.state_dict().items())
    net = m._net
    st = m.user_state(4)
    rows = torch.zeros(len(st.history), dtype=torch.int64)
    h = torch.from_numpy(st.base)[None]
    w = torch.from_numpy(st.rewards)
    items_t = torch.from_numpy(st.history)
    plain = net.adapt_phi(h, m._V, rows, items_t, w, 3)
    init = net.adapt_phi(h, m._V, rows, items_t, w, 3, init=(net.phi_gamma, net.phi_delta))
    assert torch.equal(plain[0], init[0]) and torch.equal(plain[1], init[1])


def test_group_support_grad_is_the_gradient_of_the_task_support_loss():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(3)
    N, d, B = 23, 8, 7
    net = RecMetaNet(Config(dim=d, hidden=8, encoder="none", wide="none", temperature=0.7), ItemFeatures.identity(N))
    with torch.no_grad():
        net.item_bias.copy_(torch.randn(N, generator=g))
    h = torch.randn(B, d, generator=g)
    V = torch.randn(N, d, generator=g)
    groups = torch.tensor([0, 0, 1, 1, 1, 2, 2])
    rows = torch.tensor([0, 0, 1, 2, 3, 3, 3, 5, 6, 6])  # row 4 has no support items
    items = torch.randint(0, N, (10,), generator=g)
    w = torch.rand(10, generator=g) + 0.1
    gamma0 = torch.randn(3, d, generator=g) * 0.1
    delta0 = torch.randn(3, d, generator=g) * 0.1
    gg, gd = net.support_grad(h, gamma0[groups], delta0[groups], V, rows, items, w, B, groups=groups)
    gam = gamma0.clone().requires_grad_(True)
    del_ = delta0.clone().requires_grad_(True)
    logp = torch.log_softmax(net.logits(net.apply_phi(h, gam[groups], del_[groups]), V), 1)[rows, items]
    task = groups[rows]
    loss = (torch.zeros(3).index_add(0, task, -w * logp) / torch.zeros(3).index_add(0, task, w)).sum()
    loss.backward()
    torch.testing.assert_close(gg, gam.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gd, del_.grad, rtol=1e-4, atol=1e-6)
    # adapt_phi with groups: one phi per task, expanded to its rows
    ga, da = net.adapt_phi(h, V, rows, items, w, 2, lr=0.3, groups=groups)
    assert ga.shape == (B, d) and torch.equal(ga[0], ga[1]) and torch.equal(da[2], da[4])
    assert not torch.equal(ga[0], ga[2])


def test_task_batches_hide_the_query_from_the_history(small):
    from recmeta_sdk.training.meta_tasks import task_sampler
    from recmeta_sdk.training.loop import prepare

    df, _, _ = small
    cfg = Config(**dict(TINY, batch_size=32))
    prep = prepare(df)
    s = task_sampler(parse_tasks({"by": "campaign", "users_per_task": 8}), df, prep, cfg)
    assert s.n_tasks == 3 and s.tasks_per_batch == 4  # batch_size // users_per_task; 3 tasks exist
    rng = np.random.default_rng(0)
    for _ in range(5):
        b = s.draw(rng)
        assert b.B == 24 and sorted(set(b.groups.tolist())) == [0, 1, 2]
        inner_rows, inner_items, _ = b.inner
        off = b.bag_off.numpy()
        for r in range(b.B):
            hist = set(b.bag_idx[off[r]:off[r + 1]].tolist())
            q = set(b.q_items[b.q_rows == r].tolist())
            sup = set(inner_items[inner_rows == r].tolist())
            assert not (q and sup)  # a row is a support user or a query user of its task
            assert not q & hist  # the query is never in the input
            assert sup <= hist  # support users read their whole history
        for t in range(3):
            rows_t = torch.nonzero(b.groups == t).ravel()
            assert torch.isin(rows_t, inner_rows).any() and torch.isin(rows_t, b.q_rows).any()
