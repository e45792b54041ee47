"""The wide part's memory budget and its sparse (item-neighbourhood EASE) form (issue 16)."""
from __future__ import annotations

import tracemalloc

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import recmeta_sdk as rm
from recmeta_sdk.model.network import Config, RecMetaNet, SparseWide, dense_wide_bytes
from recmeta_sdk.training.loop import _gram, _interaction_matrix, ease_from_gram, fit_wide, prepare, sparse_ease


def _dense_log(U=60, N=25, seed=0):
    """A 0/1 users x items matrix in which every pair of items co-occurs (user 0 has them all)."""
    rng = np.random.default_rng(seed)
    X = (rng.random((U, N)) < 0.3).astype(np.float64)
    X[0, :] = 1.0
    return sp.csr_matrix(X)


def _log_frame(U=80, N=30, nnz=1500, seed=0, all_pairs=True):
    rng = np.random.default_rng(seed)
    u = rng.integers(0, U, nnz)
    i = rng.integers(0, N, nnz)
    if all_pairs:  # user 0 has every item: every pair co-occurs
        u = np.concatenate([u, np.zeros(N, np.int64)])
        i = np.concatenate([i, np.arange(N)])
    df = pd.DataFrame({"user": u, "item": i}).drop_duplicates(ignore_index=True)
    df["timestamp"] = np.arange(len(df))
    df["reward"] = 1.0
    return df


def test_sparse_ease_with_every_neighbour_is_dense_ease():
    X = _dense_log()
    N = X.shape[1]
    for reg in (10.0, 250.0):
        dense = ease_from_gram(_gram(X), reg)
        Ws = sparse_ease(X, reg, N - 1)
        assert len(Ws) == 1 and isinstance(Ws[0], SparseWide)
        assert Ws[0].nnz == N * (N - 1)  # every off-diagonal entry, no diagonal
        torch.testing.assert_close(Ws[0].to_dense(), dense, rtol=1e-5, atol=1e-6)
    # cross-fitted: the weights without fold f are EASE on the other folds' users
    folds = np.arange(X.shape[0]) % 5
    Ws = sparse_ease(X, 50.0, N - 1, folds=folds)
    assert len(Ws) == 6
    torch.testing.assert_close(Ws[0].to_dense(), ease_from_gram(_gram(X), 50.0), rtol=1e-5, atol=1e-6)
    for f in range(5):
        ref = ease_from_gram(_gram(X[np.flatnonzero(folds != f)]), 50.0)
        torch.testing.assert_close(Ws[1 + f].to_dense(), ref, rtol=1e-5, atol=1e-6)


def test_sparse_ease_neighbourhoods():
    X = _dense_log(U=200, N=40, seed=1)
    W = sparse_ease(X, 100.0, 5)[0].to_dense()
    G = _gram(X).numpy()
    for a in range(40):
        col = W[:, a].numpy()
        nz = set(np.flatnonzero(col).tolist())
        assert len(nz) <= 5 and a not in nz
        # the neighbours are a's most co-occurring items (ties: the smaller id first)
        g = G[:, a].copy()
        g[a] = -1
        order = np.lexsort((np.arange(40), -g))[:5]
        assert nz <= set(order.tolist())
    # the same in small blocks (6400 bytes: still every item a candidate, 40^2 float32 counts)
    a1 = sparse_ease(X, 100.0, 5, block_bytes=6400)[0].to_dense()
    torch.testing.assert_close(a1, W, rtol=0, atol=0)
    # a budget for 10 candidates: every neighbour is one of the 10 most popular items
    top10 = set(np.lexsort((np.arange(40), -np.diag(G)))[:10].tolist())
    a2 = sparse_ease(X, 100.0, 5, block_bytes=400)[0].to_dense()
    assert set(np.flatnonzero(a2.abs().sum(1).numpy()).tolist()) <= top10


def test_sparse_ease_rejects_bad_arguments():
    X = _dense_log()
    with pytest.raises(ValueError, match="reg"):
        sparse_ease(X, 0.0, 5)
    with pytest.raises(ValueError, match="neighbours m"):
        sparse_ease(X, 1.0, 0)
    with pytest.raises(ValueError, match="folds has 3 entries"):
        sparse_ease(X, 1.0, 5, folds=np.zeros(3, np.int64))


def test_budget_rule():
    assert dense_wide_bytes(1000) == 72 * 10**6
    cfg = Config()
    assert cfg.wide_budget_bytes == 2**30
    assert RecMetaNet.wide_mode(cfg, 3861) == "dense" and RecMetaNet.wide_mode(cfg, 3862) == "sparse"
    assert RecMetaNet.wide_mode(Config(wide_budget_bytes=dense_wide_bytes(50)), 50) == "dense"
    assert RecMetaNet.wide_mode(Config(wide_budget_bytes=dense_wide_bytes(50) - 1), 50) == "sparse"
    assert RecMetaNet.wide_mode(Config(wide_budget_bytes=None), 10**6) == "dense"  # no budget
    assert RecMetaNet.wide_mode(Config(wide="none"), 50) is None
    assert RecMetaNet.wide_mode(Config(wide_max_items=49), 50) is None
    for bad in (0, -1, 1.5, True, 2**63):
        with pytest.raises(ValueError, match="wide_budget_bytes"):
            Config(wide_budget_bytes=bad).validate()
    for bad in (0, 2.0, False):
        with pytest.raises(ValueError, match="wide_neighbours"):
            Config(wide_neighbours=bad).validate()


def test_wide_offset_sparse_equals_dense():
    X = _dense_log(U=50, N=20)
    N = 20
    W = ease_from_gram(_gram(X), 30.0)
    Ws = sparse_ease(X, 30.0, N - 1)[0]
    from recmeta_sdk.model.network import ItemFeatures

    cfg = Config(dim=8, hidden=8, encoder="none", wide_recency=2.0, wide_recency_decay=0.5)
    net = RecMetaNet(cfg, ItemFeatures.identity(N))
    rows = torch.tensor([0, 0, 0, 1, 1, 2, 3, 3, 3, 3])
    items = torch.tensor([3, 5, 3, 19, 0, 7, 1, 2, 4, 1])
    a = net.wide_offset(rows, items, 5, W)  # row 4: an empty history
    b = net.wide_offset(rows, items, 5, Ws)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert torch.all(b[4] == 0)


def test_train_sparse_round_trip_and_serving(tmp_path):
    log = _log_frame(all_pairs=False)
    cfg = {"epochs": 2, "seed": 0, "dim": 16, "hidden": 16, "encoder": "none", "wide_neighbours": 6}
    dense = rm.train(log, config=cfg)
    assert dense._net.wide.numel() > 0 and dense._net.wide_sparse is None
    model = rm.train(log, config=dict(cfg, wide_budget_bytes=1000))
    net = model._net
    assert net.wide.numel() == 0 and net.wide_sparse is not None and net.has_wide
    Ws = net.wide_sparse
    assert 0 < Ws.nnz <= 6 * model.n_items
    assert int((Ws.to_dense() != 0).sum(0).max()) <= 6  # at most 6 neighbours per scored item
    users = list(model.user_ids[:3])
    recs = model.recommend(users, k=5)
    assert np.isfinite(recs.scores).all()
    # one user's wide part equals the batch's (the network's sparse product)
    state = model.adapt(list(model.item_ids[[1, 4, 7]]))
    one = model._state_wide(state)
    batch = model._wide_bias([np.asarray([1, 4, 7])], new=True)[0].numpy()
    np.testing.assert_array_equal(one, batch)
    path = tmp_path / "sparse.recmeta"
    model.save(path)
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
    assert {"net.wide_indptr", "net.wide_indices", "net.wide_values"} <= keys
    loaded = rm.load(path)
    lw = loaded._net.wide_sparse
    assert torch.equal(lw.indptr, Ws.indptr) and torch.equal(lw.indices, Ws.indices)
    assert torch.equal(lw.values, Ws.values)
    r2 = loaded.recommend(users, k=5)
    np.testing.assert_array_equal(r2.ids, recs.ids)
    np.testing.assert_array_equal(r2.scores, recs.scores)
    # new items: empty rows of the sparse wide part
    more = model.add_items(pd.DataFrame(index=pd.Index([10**6, 10**6 + 1])))
    mw = more._net.wide_sparse
    assert mw.n == model.n_items + 2 and mw.nnz == Ws.nnz
    assert int(mw.indptr[-1]) == int(mw.indptr[-3]) == Ws.nnz
    np.testing.assert_array_equal(more.recommend(users, k=5).ids, recs.ids)


def test_corrupt_sparse_wide_part_is_refused(tmp_path):
    from safetensors.torch import load_file

    from recmeta_sdk.model.io import ModelFileError

    log = _log_frame(all_pairs=False, seed=3)
    model = rm.train(log, config={"epochs": 1, "seed": 0, "dim": 8, "hidden": 8, "encoder": "none",
                                  "wide_budget_bytes": 1000, "wide_neighbours": 4})
    path = tmp_path / "m.recmeta"
    model.save(path)
    t = load_file(str(path))
    assert t["net.wide_indices"].dtype == torch.int32 and t["net.wide_indptr"].dtype == torch.int64
    # the loader's checks on the sparse tensors (the mutation suite covers the file format itself)
    from recmeta_sdk.api import _check_csr

    ip, ix = t["net.wide_indptr"].numpy(), t["net.wide_indices"].numpy().copy()
    _check_csr(ip, ix, model.n_items, "sparse wide part", path)
    ix[0] = model.n_items
    with pytest.raises(ModelFileError, match="sparse wide part index"):
        _check_csr(ip, ix, model.n_items, "sparse wide part", path)


def test_no_dense_users_by_items_matrix():
    """A log whose dense users x items matrix would take 24 GB (and its Gram matrix 7.2 GB): the
    sparse wide part is built with numpy / scipy allocations far below either."""
    rng = np.random.default_rng(0)
    U, N, nnz = 100_000, 30_000, 300_000
    items = (rng.zipf(1.3, nnz) - 1) % N
    users = rng.integers(0, U, nnz)
    users[:U] = np.arange(U)
    log = pd.DataFrame({"user": users, "item": items, "reward": np.ones(nnz, np.float32)})
    prep = prepare(log, np.arange(N))
    cfg = Config(wide_neighbours=16)
    assert RecMetaNet.wide_mode(cfg, N) == "sparse"
    tracemalloc.start()
    try:
        X = _interaction_matrix(prep)
        assert sp.issparse(X) and X.shape == (U, N)
        Ws = sparse_ease(X, 250.0, 16, folds=np.arange(U) % 5, block_bytes=2**26)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(Ws) == 6 and Ws[0].nnz <= 16 * N
    assert peak < 400 * 2**20, f"peak {peak / 2**20:.0f} MiB"  # dense X: 24 GB; dense Gram: 7.2 GB


def test_fit_wide_sparse_fills_network():
    log = _log_frame(U=100, N=40, nnz=2000, seed=2, all_pairs=False)
    prep = prepare(log, np.arange(40))
    from recmeta_sdk.model.network import ItemFeatures

    cfg = Config(dim=8, hidden=8, encoder="none", wide_budget_bytes=1, wide_neighbours=5, wide_reg=100.0)
    net = RecMetaNet(cfg, ItemFeatures.identity(40))
    assert net.wide_sparse is not None and net.wide_sparse.nnz == 0
    fold, others = fit_wide(net, prep, cfg, np.random.default_rng(0))
    ref = sparse_ease(_interaction_matrix(prep), 100.0, 5)[0]
    assert torch.equal(net.wide_indptr, ref.indptr) and torch.equal(net.wide_values, ref.values)
    assert len(others) == 5 and all(isinstance(w, SparseWide) for w in others)
    assert fold.shape == (len(prep.user_ids),)


def test_validation_tuned_training_needs_the_dense_part():
    log = _log_frame(seed=4)
    with pytest.raises(ValueError, match="validation-tuned training needs the dense wide part"):
        rm.train(log, config={"epochs": 1, "validation": 0.5, "wide_budget_bytes": 1, "encoder": "none"})


def test_ndcg_plus_recall_without_a_dense_truth_matrix():
    """The validation metric from sorted (row, item) keys equals the dense membership matrix's."""
    from recmeta_sdk.training.loop import _ndcg_plus_recall

    rng = np.random.default_rng(0)
    truth = [set(rng.choice(50, rng.integers(1, 8), replace=False).tolist()) for _ in range(30)]
    top = np.stack([rng.permutation(50)[:10] for _ in range(30)])
    T = np.zeros((30, 50), bool)
    for r, t in enumerate(truth):
        T[r, list(t)] = True
    disc = 1.0 / np.log2(np.arange(2, 12))
    hit = np.take_along_axis(T, top, 1).astype(np.float64)
    sizes = np.array([len(t) for t in truth])
    ref = (hit * disc).sum(1) / np.cumsum(disc)[np.minimum(sizes, 10) - 1] + hit.sum(1) / sizes
    np.testing.assert_array_equal(_ndcg_plus_recall(top, truth, 10), ref)
    assert _ndcg_plus_recall(top[:, :3], truth, 3).shape == (30,)
