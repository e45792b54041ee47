"""The learning parts of the SDK on synthetic problems with known answers."""
import numpy as np
import pandas as pd
import pytest
import torch

import recmeta_sdk as rm
from recmeta_sdk.training.loop import reinforce_loss, reinforce_weights

TINY = {"dim": 16, "hidden": 32, "encoder": "none", "seq_len": 4, "batch_size": 32, "lr": 0.02,
        "dropout": 0.0, "user_feature_dropout": 0.0}

pytestmark = pytest.mark.usefixtures("one_torch_thread")



def test_reinforce_gradient_matches_closed_form():
    g = torch.Generator().manual_seed(7)
    N, K, cap = 13, 5, 3.0
    s = (torch.randn(N, generator=g, dtype=torch.float64)).requires_grad_(True)
    a, r = 4, 0.7
    beta = torch.tensor(0.03, dtype=torch.float64)
    logp = torch.log_softmax(s, 0)[a]
    loss = reinforce_loss(logp, torch.tensor(r, dtype=torch.float64), beta, cap, K)
    loss.backward()
    p = torch.softmax(s.detach(), 0)
    pi = p[a]
    w = min(float(pi / beta), cap) * K * (1 - float(pi)) ** (K - 1)
    e = torch.zeros(N, dtype=torch.float64)
    e[a] = 1
    expected = -r * w * (e - p)
    np.testing.assert_allclose(s.grad.numpy(), expected.numpy(), rtol=1e-10, atol=1e-12)


def test_reinforce_weights_cap_and_topk_factor():
    pi = torch.tensor([0.5, 0.01, 0.2])
    beta = torch.tensor([0.01, 0.02, 0.2])
    w = reinforce_weights(pi, beta, cap=10.0, K=3)
    lam = 3 * (1 - pi) ** 2
    np.testing.assert_allclose(w.numpy(), (torch.tensor([10.0, 0.5, 1.0]) * lam).numpy(), rtol=1e-6)
    # K = 1 is plain importance-weighted REINFORCE
    np.testing.assert_allclose(reinforce_weights(pi, beta, 100.0, 1).numpy(), (pi / beta).numpy(), rtol=1e-6)


def _bandit_logs(n_users=120, n_items=20, seed=0, best=(3, 15)):
    """Two user groups; each is logged uniformly over its own half of the catalogue
    (propensity 1/10) and only one item per group pays (reward 1; others 0)."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        grp = u % 2
        pool = np.arange(10) + 10 * grp
        for t in range(12):
            a = int(rng.choice(pool))
            rows.append((u, a, t, 1.0 if a == best[grp] else 0.0, 0.1))
    return pd.DataFrame(rows, columns=["user", "item", "timestamp", "reward", "propensity"])


@pytest.mark.parametrize("sampled", [False, True])
def test_offpolicy_reinforce_finds_the_rewarding_item(sampled):
    logs = _bandit_logs()
    cfg = dict(TINY, epochs=40, ce_weight=0.0, rl_weight=1.0, meta="none", topk_k=1, seed=3,
               prefix_prob=0.5, max_prefix=6)
    if sampled:
        cfg.update(full_softmax_max=10, n_negatives=16)
    model = rm.train(logs, config=cfg)
    for grp, best in ((0, 3), (1, 15)):
        hist = [i + 10 * grp for i in (0, 1, 2, 4)]
        rec = model.recommend(model.adapt(hist, steps=0), k=1, exclude_seen=False)
        assert rec.ids[0] == best
    # the supervised objective with every logged row a target (every reward 1) only imitates
    # the uniform logging: no such preference
    imit = rm.train(logs.assign(reward=1.0), config=dict(cfg, ce_weight=1.0, rl_weight=0.0))
    st = imit.adapt([0, 1, 2, 4], steps=0)
    pi = torch.softmax(torch.from_numpy(imit.recommend(st, k=20, exclude_seen=False).scores), 0)
    assert float(pi.max()) < 0.25
    # by default only the rewarded rows are targets: the supervised objective finds the item too
    sup = rm.train(logs, config=dict(cfg, ce_weight=1.0, rl_weight=0.0))
    assert sup.recommend(sup.adapt([0, 1, 2, 4], steps=0), k=1, exclude_seen=False).ids[0] == 3


def _reward_only_tasks(n_users=160, n_items=20, seed=0):
    """Users see the same uniform mix of items; which half pays only shows in the rewards.

    The encoder reads which items were seen (not their rewards), so only the adaptation
    step, which weights the support items by reward, can tell the two groups apart."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        grp = u % 2
        items = rng.permutation(n_items)[:16]
        for t, a in enumerate(items):
            good = (a < 10) == (grp == 0)
            rows.append((u, int(a), t, 1.0 if good else 0.0))
    return pd.DataFrame(rows, columns=["user", "item", "timestamp", "reward"])


def _good_fraction(model, steps, seed=11):
    rng = np.random.default_rng(seed)
    fr = []
    for grp in (0, 1):
        for _ in range(10):
            items = rng.permutation(20)[:6]
            rewards = [1.0 if (a < 10) == (grp == 0) else 0.0 for a in items]
            st = model.adapt({"item": items, "reward": rewards}, steps=steps)
            rec = model.recommend(st, k=5, exclude_seen=False)
            fr.append(np.mean([(a < 10) == (grp == 0) for a in rec.ids]))
    return float(np.mean(fr))


def test_meta_training_beats_no_meta_training():
    logs = _reward_only_tasks()
    base = dict(TINY, epochs=50, ce_weight=0.0, rl_weight=1.0, topk_k=1, inner_steps=2, inner_lr=0.05,
                seed=5, lr=0.03, prefix_prob=0.0, input_dropout=0.5)
    meta = rm.train(logs, config=dict(base, meta="fomaml"))
    plain = rm.train(logs, config=dict(base, meta="none"))
    f_meta = _good_fraction(meta, 2)
    f_plain0 = _good_fraction(plain, 0)
    f_plain_ft = _good_fraction(plain, 2)
    assert f_plain0 < 0.7  # the encoder alone cannot tell the groups apart
    assert f_meta > 0.9
    assert f_meta > f_plain_ft + 0.2
    assert f_meta > _good_fraction(meta, 0) + 0.2  # and it is the adaptation that does it


def test_user_weights_follow_query_sizes():
    from recmeta_sdk.training.loop import _user_weights

    rows = torch.tensor([0, 0, 0, 0, 2, 3, 3, 3, 3, 3, 3, 3, 3, 3])  # sizes 4, 0, 1, 9
    n = torch.tensor([4.0, 0.0, 1.0, 9.0])
    for power in (-0.5, 0.0, 0.5, 1.0):
        w = _user_weights(rows, 4, power)
        expected = torch.where(n > 0, n.pow(power), torch.zeros(4))
        np.testing.assert_allclose(w.numpy(), (expected / expected.sum()).numpy(), rtol=1e-6)
    assert float(_user_weights(rows, 4, 0.5)[1]) == 0.0  # no query items, no weight


def test_query_weight_zero_is_the_per_user_mean():
    """query_weight=0 is the mean over users of each user's mean loss over its query items."""
    from recmeta_sdk.model import Config, ItemFeatures, RecMetaNet
    from recmeta_sdk.training.loop import _segment_mean, _user_weights

    rows = torch.tensor([0, 1, 1, 1, 2, 2])
    vals = torch.tensor([1.0, 2.0, 4.0, 6.0, 3.0, 5.0])
    w = _user_weights(rows, 3, 0.0)
    assert abs(float((w * _segment_mean(vals, rows, 3)).sum()) - (1.0 + 4.0 + 4.0) / 3) < 1e-6
    # and with power 1 the mean over all query items
    w1 = _user_weights(rows, 3, 1.0)
    assert abs(float((w1 * _segment_mean(vals, rows, 3)).sum()) - float(vals.mean())) < 1e-6
    with pytest.raises(ValueError, match="query_weight"):
        Config(query_weight=1.5).validate()
    with pytest.raises(ValueError, match="meta_tasks"):
        Config(meta_tasks="items").validate()
    RecMetaNet(Config(dim=8, hidden=8, heads=2), ItemFeatures.identity(5))


def test_network_init_uses_its_own_generator():
    from recmeta_sdk.model import Config, ItemFeatures, RecMetaNet

    for enc in ("transformer", "gru"):
        cfg = Config(dim=8, hidden=8, heads=2, encoder=enc, seed=4)
        torch.manual_seed(1)
        a = RecMetaNet(cfg, ItemFeatures.identity(7)).state_dict()
        torch.manual_seed(2)
        state = torch.random.get_rng_state()
        b = RecMetaNet(cfg, ItemFeatures.identity(7)).state_dict()
        assert torch.equal(state, torch.random.get_rng_state())
        assert all(torch.equal(a[k], b[k]) for k in a)
        c = RecMetaNet(Config(dim=8, hidden=8, heads=2, encoder=enc, seed=5), ItemFeatures.identity(7)).state_dict()
        assert not torch.equal(a["seq.weight_ih_l0" if enc == "gru" else "seq.layers.0.linear1.weight"],
                               c["seq.weight_ih_l0" if enc == "gru" else "seq.layers.0.linear1.weight"])


def test_meta_tasks_prefix_adapts_only_prefix_samples():
    """With meta_tasks='prefix' the step sizes learn only from the prefix samples: without
    any (prefix_prob=0) they get no gradient; with prefixes they do."""
    from recmeta_sdk.model import Config, ItemFeatures, RecMetaNet
    from recmeta_sdk.training.loop import batch_loss, make_batch, prepare

    logs = _reward_only_tasks(n_users=20)
    prep = prepare(logs)
    grads = {}
    for pp in (0.0, 1.0):
        cfg = Config(**dict(TINY, meta_tasks="prefix", prefix_prob=pp, seed=2)).validate()
        net = RecMetaNet(cfg, ItemFeatures.identity(len(prep.item_ids)))
        batch = make_batch(prep, np.arange(8), cfg, np.random.default_rng(0))
        assert bool(batch.prefix.all()) == (pp == 1.0) and not (pp == 0.0 and batch.prefix.any())
        loss, _ = batch_loss(net, batch, cfg)
        loss.backward()
        grads[pp] = float(net.log_lr.grad.abs().sum()) if net.log_lr.grad is not None else 0.0
    assert grads[0.0] == 0.0
    assert grads[1.0] > 0.0


def test_demo_cold_report_weights_users_and_reports_fold_standard_errors():
    from recmeta_sdk.demo import KS, _cold_report

    def m(r, n):
        return {"recall@10": r, "ndcg@10": n}

    sums = {name: {k: [(100, m(0.1 + off, 0.3)), (300, m(0.2 + off, 0.5))] for k in KS}
            for name, off in (("recmeta, meta-adapted", 0.0), ("popularity", 0.01))}
    lines = []
    res = _cold_report(sums, 2, lines.append)
    assert abs(res["table"]["recmeta, meta-adapted"][10]["recall@10"] - 0.175) < 1e-12  # user-weighted
    assert abs(res["table"]["popularity"][5]["ndcg@10"] - 0.45) < 1e-12
    assert res["n_users"] == 400
    se = next(ln for ln in lines if "+- recmeta" in ln).split()
    # s.e. over the 2 fold means: std(ddof=1)/sqrt(2) = |0.2 - 0.1| / 2
    assert abs(float(se[-6]) - 0.05) < 1e-4 and abs(float(se[-5]) - 0.1) < 1e-4
    assert any(ln.startswith("  fold 1 (300 users)") for ln in lines)
