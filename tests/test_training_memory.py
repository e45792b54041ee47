"""Held-out scoring in blocks of users (issue 16 item 2): the calibration of the wide part and the
validation's early-stopping score never hold a users x items matrix, and score as before."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import recmeta_sdk as rm
from recmeta_sdk.training import loop

TINY = {"dim": 8, "hidden": 16, "encoder": "none", "epochs": 2, "batch_size": 16, "seed": 3}


def _log(n_users: int = 90, n_items: int = 61, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        for t, i in enumerate(rng.choice(n_items, int(rng.integers(6, 20)), replace=False)):
            rows.append((u, int(i), t, float(rng.integers(1, 6))))
    return pd.DataFrame(rows, columns=["user", "item", "timestamp", "reward"])


def _train(config, blocks_of_rows=None, monkeypatch=None):
    if blocks_of_rows is not None:
        monkeypatch.setattr(loop, "SCORE_BLOCK_BYTES", 4 * 61 * blocks_of_rows)
    return rm.train(_log(), config=dict(TINY, **config), progress=False, num_threads=1)


@pytest.mark.parametrize("config", [{"calib_users": 0.5}, {"validation": 0.5, "wide": "none"}],
                         ids=["calibration", "validation"])
def test_blocks_of_users_score_like_one_block(config, monkeypatch):
    whole = _train(config)
    assert len(loop._row_blocks(45, 61)) == 1  # the default: these sets are one block
    blocked = _train(config, blocks_of_rows=7, monkeypatch=monkeypatch)
    assert len(loop._row_blocks(45, 61)) == 7
    key = "calibration" if "calib_users" in config else "validation"
    a, b = whole.history[key], blocked.history[key]
    if key == "calibration":
        assert a.keys() == b.keys()
        np.testing.assert_allclose([a[m] for m in a], [b[m] for m in a], rtol=0, atol=1e-9)
        assert float(whole._net.wide_scale[0]) == float(blocked._net.wide_scale[0])
    else:
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-9)
        assert whole.history["best_epoch"] == blocked.history["best_epoch"]
    assert whole.config.temperature == blocked.config.temperature
    users = list(range(20))
    ra, rb = whole.recommend(users, k=5), blocked.recommend(users, k=5)
    np.testing.assert_array_equal(ra.ids, rb.ids)
    np.testing.assert_allclose(ra.scores, rb.scores, rtol=1e-6)


def test_fold_offsets_equal_the_per_fold_sum():
    """Each fold's rows pooled on their own equal the sum over folds of full-batch offsets."""
    import torch

    from recmeta_sdk.model.network import Config, ItemFeatures, RecMetaNet

    N, B = 29, 11
    net = RecMetaNet(Config(dim=4, hidden=4, encoder="none", wide="ease", wide_budget_bytes=None),
                     ItemFeatures.identity(N), 0)
    g = torch.Generator().manual_seed(0)
    Ws = [torch.randn(N, N, generator=g) for _ in range(3)]
    rows = torch.sort(torch.randint(0, B, (40,), generator=g)).values
    items = torch.randint(0, N, (40,), generator=g)
    fold = torch.randint(0, 3, (B,), generator=g)
    ref = torch.zeros(B, N)
    for f, W in enumerate(Ws):
        sel = fold[rows] == f
        if sel.any():
            ref = ref + net.wide_offset(rows[sel], items[sel], B, W)
    torch.testing.assert_close(loop._fold_offsets(net, rows, items, B, fold, Ws), ref, rtol=0, atol=0)


def _setup(N: int, B: int):
    """An untrained network over N items with a sparse wide part (2 random neighbours per
    item, 2 cross-fitted folds), B held-out users with 12 history items and 3 truth items each."""
    import scipy.sparse as sp
    import torch

    from recmeta_sdk.model.network import Config, ItemFeatures, RecMetaNet, SparseWide

    rng = np.random.default_rng(0)
    items = [rng.choice(N, 12, replace=False) for _ in range(B)]
    prep = loop.Prepared(np.arange(B), np.arange(N), np.arange(0, 12 * B + 1, 12, dtype=np.int64),
                         np.concatenate(items).astype(np.int64), np.ones(12 * B, np.float32), None,
                         np.bincount(np.concatenate(items), minlength=N))
    cfg = Config(dim=8, hidden=8, encoder="none", wide="ease", wide_budget_bytes=1, inner_steps=1, seed=0)
    net = RecMetaNet(cfg, ItemFeatures.identity(N), 0)

    def sparse_w(seed):
        r = np.random.default_rng(seed)
        return SparseWide.from_scipy(sp.csr_matrix((r.random(2 * N).astype(np.float32),
                                                    (np.repeat(np.arange(N), 2), r.integers(0, N, 2 * N))),
                                                   shape=(N, N)))

    W = [sparse_w(s) for s in range(3)]
    net.set_wide_sparse(W[0])
    cross = (torch.from_numpy(np.arange(B) % 2), W[1:])
    truth = [set(rng.choice(N, 3, replace=False).tolist()) for _ in range(B)]
    return net, prep, cfg, cross, truth, loop.Validation(prep, np.arange(B), truth)


def test_held_out_scoring_never_builds_a_users_x_items_matrix(monkeypatch):
    """Every users x items tensor of the calibration and of the early-stopping score (wide
    offsets, adaptation, logits) has at most a block of rows, and the results are those of
    the whole set scored at once. (Torch's CPU allocations are invisible to tracemalloc; peak
    RSS measured by hand at 60k items x 200 users: 30 / 5-22 MB above the RSS before the call
    in blocks of 2 MiB, against 305 / 291 MB with the whole set as one block.)"""
    import torch

    from recmeta_sdk.model.network import RecMetaNet

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # (many small blocks: 2 threads on a shared machine cost 30x)
    try:
        _check_blocks(monkeypatch, RecMetaNet)
    finally:
        torch.set_num_threads(threads)


def _check_blocks(monkeypatch, RecMetaNet):
    N, B, rows = 997, 120, 7
    net, prep, cfg, cross, truth, val = _setup(N, B)
    temperature = cfg.temperature
    whole_cal = loop.calibrate_wide(net, prep, np.arange(B), truth, cross, cfg)
    whole_val = loop._epoch_score(net, cfg, [val.warm])
    seen = []

    def spy(name, rows_of):
        real = getattr(RecMetaNet, name)

        def wrapped(self, *args, **kwargs):
            out = real(self, *args, **kwargs)
            seen.append((name, rows_of(args, out)))
            return out

        monkeypatch.setattr(RecMetaNet, name, wrapped)

    spy("logits", lambda a, out: out.shape[0])
    spy("adapt_phi", lambda a, out: a[0].shape[0])
    spy("wide_offset", lambda a, out: out.shape[0])
    monkeypatch.setattr(loop, "SCORE_BLOCK_BYTES", 4 * N * rows)
    cfg.temperature = temperature  # (the first call may have re-fitted it: start where it started)
    cal = loop.calibrate_wide(net, prep, np.arange(B), truth, cross, cfg)
    score = loop._epoch_score(net, cfg, [val.warm])
    assert {n for n, _ in seen} == {"logits", "adapt_phi", "wide_offset"}
    assert max(r for _, r in seen) == rows, seen  # never all B = 120 users at once
    assert cal.keys() == whole_cal.keys()
    np.testing.assert_allclose([cal[m] for m in cal], [whole_cal[m] for m in cal], rtol=0, atol=1e-9)
    assert abs(score - whole_val) <= 1e-9


def test_adamw_and_clipping_match_torch():
    """The loop's own AdamW (multi-tensor updates; no torch.optim import in training) and
    gradient clipping equal torch.optim.AdamW and torch.nn.utils.clip_grad_norm_ on random
    parameters of odd shapes, with a parameter that has no gradient."""
    from recmeta_sdk.training.loop import AdamW, clip_grad_norm

    g = torch.Generator().manual_seed(5)
    ps = [torch.randn(7, 5, generator=g).requires_grad_(), torch.randn(3, generator=g).requires_grad_(),
          torch.randn(2, 9, generator=g).requires_grad_()]
    ref = [p.detach().clone().requires_grad_() for p in ps]
    ours = AdamW([{"params": ps[:2], "base_lr": 1e-2}, {"params": ps[2:], "base_lr": 1e-2}], lr=1e-2, weight_decay=0.05)
    theirs = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.05)
    for step in range(6):
        for i, (p, r) in enumerate(zip(ps, ref)):
            if step == 3 and i == 1:  # no gradient this step: the parameter is left alone
                p.grad = r.grad = None
                continue
            gr = torch.randn(p.shape, generator=g) * 3.0
            p.grad, r.grad = gr.clone(), gr.clone()
        before = ps[1].detach().clone()
        clip_grad_norm(ps, 1.0)
        torch.nn.utils.clip_grad_norm_(ref, 1.0)
        ours.step()
        theirs.step()
        if step == 3:
            assert torch.equal(ps[1], before)
        # one step count for all parameters (torch counts per parameter): the parameter that
        # skipped a step is compared up to then only
        for i, (p, r) in enumerate(zip(ps, ref)):
            if i != 1 or step < 3:
                torch.testing.assert_close(p, r, rtol=1e-6, atol=1e-7)


def test_fusion_curve_search_remembers_scores_without_changing_the_choice(monkeypatch):
    """_fit_curve scores each distinct curve of a set once (the short sets see only the first
    two values): the same curve as scoring every request, in fewer scorings."""
    g = torch.Generator().manual_seed(11)
    N = 57
    sets = []
    for j, (name, n) in enumerate([("warm", 40.0), ("first 5", 5.0), ("first 10", 10.0), ("first 20", 20.0)]):
        U = 23 + j
        D = torch.randn(U, N, generator=g)
        E = torch.randn(U, N, generator=g) * 0.01 + 0.02 * D  # correlated with D, on another scale
        lens = torch.full((U,), n) if j else torch.randint(21, 300, (U,), generator=g).to(torch.float32)
        truth = [set(torch.randint(0, N, (4,), generator=g).tolist()) for _ in range(U)]
        sets.append((name, n, D, E, torch.log1p(lens), truth))
    calls = []
    real = loop._val_score
    monkeypatch.setattr(loop, "_val_score", lambda *a: calls.append(1) or real(*a))
    fast = loop._fit_curve(sets, 0)
    n_fast = len(calls)
    calls.clear()
    slow = loop._fit_curve(sets, 0, remember=False)
    assert fast == slow
    assert n_fast < 0.75 * len(calls), (n_fast, len(calls))


def test_auto_epochs_resolve_from_the_step_budget(monkeypatch):
    """Config.epochs None (the default) trains AUTO_STEPS // steps-per-epoch epochs, within
    [1, AUTO_EPOCHS], and writes the number back; an explicit value is kept."""
    from recmeta_sdk.model import network

    assert network.Config().epochs is None
    assert network.auto_epochs(8) == network.AUTO_EPOCHS  # MovieLens-100K: 943 users, 8 steps
    assert network.auto_epochs(47) == network.AUTO_STEPS // 47
    assert network.auto_epochs(10 ** 6) == 1
    monkeypatch.setattr(network, "AUTO_STEPS", 7)  # 90 users, batch 16: 6 steps an epoch -> 1 epoch
    cfg = {k: v for k, v in TINY.items() if k != "epochs"}
    m = rm.train(_log(), config=dict(cfg, validation=0), progress=False, num_threads=1)
    assert m.config.epochs == 1 and len(m.history["loss"]) == 1
    m = rm.train(_log(), config=dict(cfg, validation=0, epochs=3), progress=False, num_threads=1)
    assert m.config.epochs == 3 and len(m.history["loss"]) == 3
    with pytest.raises(ValueError, match="epochs"):
        rm.train(_log(), config=dict(cfg, epochs=0), progress=False)


def test_rows_times_equals_the_dense_product():
    """The validation scoring's sparse product (an embedding bag over W's rows) equals x @ W
    on random sparse rows with weights, an empty row included; float64 falls back to @."""
    g = torch.Generator().manual_seed(3)
    x = (torch.rand(13, 29, generator=g) < 0.15).to(torch.float32) * (torch.rand(13, 29, generator=g) + 0.5)
    x[4] = 0.0
    W = torch.randn(29, 29, generator=g)
    torch.testing.assert_close(loop._rows_times(x, W), x @ W, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loop._rows_times(x.double(), W.double()), x.double() @ W.double())


@pytest.mark.parametrize("layers", [1, 2])
def test_causal_last_equals_the_full_causal_encoder(layers):
    """The user state's sequence read-out computes only the last layer's read-out positions
    (network._causal_last); values and gradients equal the full causal transformer's output
    at those positions (dropout off), odd sizes and a length-1 sequence included."""
    from torch import nn

    from recmeta_sdk.model.network import _causal_last

    torch.manual_seed(0)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(6, 2, dim_feedforward=10, dropout=0.0, batch_first=True,
                                                           norm_first=True), layers, enable_nested_tensor=False)
    B, L = 7, 5
    g = torch.Generator().manual_seed(1)
    e = torch.randn(B, L, 6, generator=g).requires_grad_()
    last = torch.tensor([0, 4, 2, 3, 1, 4, 0])
    mask = torch.triu(torch.full((L, L), float("-inf")), diagonal=1)
    for train in (True, False):
        enc.train(train)
        want = enc(e, mask=mask, is_causal=True)[torch.arange(B), last]
        got = _causal_last(enc, e, last)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        gw = torch.autograd.grad((want * want).sum(), [e] + list(enc.parameters()))
        gg = torch.autograd.grad((got * got).sum(), [e] + list(enc.parameters()))
        for a, b in zip(gg, gw):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_fusion_curves_stay_within_the_model_file_limits():
    """Every curve the fusion search can choose has |log m| <= LoadLimits.max_log_step (a
    model trained on a simulator world chose log m = -10.2 and then failed to load), and the
    search scores exactly the curve the network serves."""
    from recmeta_sdk.model.io import LoadLimits

    lo, hi = min(loop.FUSION_GRID), max(loop.FUSION_GRID)
    ln = torch.log1p(torch.tensor([1.0, 5.0, 12.0, 20.0, 30.0, 80.0, 600.0]))
    for a_lo in (lo, 1.0, hi):
        for a_mid in (a_lo, hi):
            for a_hi in (lo, hi):
                for n_hi in loop.FUSION_N_HI:
                    coef, scale = loop._alpha_params(a_lo, a_mid, a_hi, n_hi)
                    assert abs(float(scale[0])) <= LoadLimits().max_log_step, (a_lo, a_mid, a_hi, n_hi, scale)
                    (c0, c1), (s0, s1, s2) = coef, scale
                    served = torch.exp(s0 * ((ln - torch.log1p(s1)) / (torch.log1p(s2) - torch.log1p(s1))).clamp(0, 1)) \
                        * torch.nn.functional.softplus(c0 + c1 * ln)
                    torch.testing.assert_close(loop._alpha_curve(ln, a_lo, a_mid, a_hi, n_hi), served, rtol=1e-5, atol=1e-6)
