"""Dense item features (e.g. text embeddings) and item cold start (Recommender.add_items)."""
import hashlib
import json
import sys

import numpy as np
import pandas as pd
import pytest
import torch

import recmeta_sdk as rm
from recmeta_sdk.model.io import ModelFileError, read_model_file, write_model_file
from recmeta_sdk.training.loop import build_schema, dense_matrix, encode_dense, schema_names

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CFG = {"dim": 16, "hidden": 32, "seq_len": 5, "layers": 1, "heads": 2, "epochs": 10, "batch_size": 64,
       "lr": 0.01, "inner_steps": 1}


def clustered(seed=0, n_train=150, n_cold=50, K=6, D=12, n_users=300, per_user=12):
    """Items in K clusters of their dense vector; each user likes one cluster (10 of 12
    interactions in it). The last ``n_cold`` items never appear in the log."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(K, D))
    n = n_train + n_cold
    cl = rng.integers(K, size=n)
    X = centers[cl] + 0.3 * rng.normal(size=(n, D))
    ids = np.arange(n) + 1000
    pref = rng.integers(K, size=n_users)
    train_items = np.arange(n_train)
    rows = []
    for u in range(n_users):
        pool = train_items[cl[train_items] == pref[u]]
        other = train_items[cl[train_items] != pref[u]]
        m = min(per_user, len(pool))
        chosen = list(rng.choice(pool, size=m - 2, replace=False)) + list(rng.choice(other, size=2, replace=False))
        rng.shuffle(chosen)
        rows += [(u, int(ids[i]), t) for t, i in enumerate(chosen)]
    log = pd.DataFrame(rows, columns=["user", "item", "timestamp"])
    items = pd.DataFrame({"emb": [X[i].astype(np.float32) for i in range(n)],
                          "kind": [f"k{i % 3}" for i in range(n)]}, index=pd.Index(ids, name="item"))
    return log, items.iloc[:n_train], items.iloc[n_train:], pref, cl[n_train:], cl[:n_train]


@pytest.fixture(scope="module")
def syn():
    log, tr, cold, pref, cold_cl, tr_cl = clustered()
    model = rm.train(log, items=tr, config=CFG)
    return model, log, tr, cold, pref, cold_cl, tr_cl


def _cold_recall(model, cold_ids, pref, cold_cl, k=10):
    rec = []
    for u in range(len(pref)):
        truth = set(cold_ids[cold_cl == pref[u]].tolist())
        if truth:
            r = model.recommend(u, k=k, candidates=cold_ids)
            rec.append(len(truth & set(r.ids.tolist())) / min(k, len(truth)))
    return float(np.mean(rec))


# ------------------------------------------------------------------------- schema

def test_dense_columns_are_detected_centred_and_validated():
    idx = pd.Index([10, 11, 12], name="item")
    df = pd.DataFrame({"v": [np.array([1.0, 2.0]), np.array([3.0, 2.0]), None],
                       "codes": [[1, 2], [3], [2]], "f": [[0.5, 1], [1, 2.5], [0.0, 0.0]]}, index=idx)
    schema = build_schema(df, 10)
    kinds = {f["column"]: f["kind"] for f in schema}
    assert kinds == {"v": "dense", "codes": "multi", "f": "dense"}  # integer lists stay categorical codes
    v = next(f for f in schema if f["column"] == "v")
    assert v["dim"] == 2 and v["mean"] == [2.0, 2.0] and v["scale"] == pytest.approx(1.0)
    assert all("v" not in n.split("=")[0] for n in schema_names(schema))  # no table rows
    M = dense_matrix(schema, df, np.array([10, 11, 12, 99]))
    assert M.shape == (4, 4) and M.dtype == np.float32
    np.testing.assert_allclose(M[0, :2], [-1.0, 0.0])
    np.testing.assert_array_equal(M[2, :2], [0.0, 0.0])  # missing: the mean item
    np.testing.assert_array_equal(M[3], 0.0)  # absent from the frame
    # a new record is encoded with the training centring / scaling
    np.testing.assert_allclose(encode_dense(schema, {"v": [4.0, 2.0], "f": None}), [2.0, 0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match=r"'v'.*12.*length|'v'.*12.*shape"):
        build_schema(df.assign(v=[np.ones(2), np.ones(2), np.ones(3)]), 10)
    with pytest.raises(ValueError, match=r"'v'.*11.*non-finite"):
        build_schema(df.assign(v=[np.ones(2), np.array([1.0, np.nan]), np.ones(2)]), 10)
    with pytest.raises(ValueError, match=r"'v'.*12"):
        build_schema(df.assign(v=[np.ones(2), np.ones(2), "abc"]), 10)
    with pytest.raises(ValueError, match=r"'v'.*'new'.*shape"):
        encode_dense(schema, {"v": [1.0, 2.0, 3.0]}, "new")


def test_train_rejects_bad_dense_items_naming_column_and_item():
    log, tr, *_ = clustered(n_users=20)
    bad = tr.copy()
    bad.at[1003, "emb"] = np.ones(5, np.float32)
    with pytest.raises(ValueError, match=r"'emb'.*1003"):
        rm.train(log, items=bad, config=dict(CFG, epochs=1))
    bad.at[1003, "emb"] = np.full(12, np.inf, np.float32)
    with pytest.raises(ValueError, match=r"'emb'.*1003.*non-finite"):
        rm.train(log, items=bad, config=dict(CFG, epochs=1))


def test_item_vectors_add_the_projection_of_the_dense_features(syn):
    model = syn[0]
    net = model._net
    N = model.n_items
    assert net.item_dense.shape == (N, 12) and net.item_dense_proj.shape == (12, 2 * model.dim)
    X, V = net.item_vectors()
    both = torch.zeros(N, 2 * model.dim)
    off, idx, w = net.feat_offsets, net.feat_indices, net.feat_weights
    table = torch.cat([net.emb_in, net.emb_out], 1)
    for i in range(N):
        rows = idx[off[i]:off[i + 1]]
        both[i] = (w[off[i]:off[i + 1], None] * table[rows]).sum(0)
    both = both + net.item_dense @ net.item_dense_proj
    torch.testing.assert_close(torch.cat([X, V], 1), both, rtol=1e-5, atol=1e-6)
    # the projection is trained (it moved away from its initial values)
    init = torch.randn(12, 2 * model.dim, generator=torch.Generator().manual_seed(model.config.seed + 7919)) * 0.05
    assert (net.item_dense_proj - init).abs().max() > 1e-2


# ------------------------------------------------------------------------- cold start

def test_cold_items_are_recommended_to_users_of_similar_items(syn):
    """The hard test: preference is a function of the dense feature; 50 items never seen in
    training must be ranked for each user by their feature alone."""
    model, log, _, cold, pref, cold_cl, _ = syn
    m2 = model.add_items(cold)
    cold_ids = cold.index.to_numpy()
    recall = _cold_recall(m2, cold_ids, pref, cold_cl)
    chance = 10 / len(cold_ids)
    assert recall > 0.8 and recall > 3 * chance, (recall, chance)
    # control: the same items with their dense vectors shuffled are ranked near chance,
    # so it is the dense feature that carries the signal
    rng = np.random.default_rng(5)
    shuffled = cold.assign(emb=list(cold["emb"].to_numpy()[rng.permutation(len(cold))]))
    r_shuf = _cold_recall(model.add_items(shuffled), cold_ids, pref, cold_cl)
    assert r_shuf < 0.45 * recall, (r_shuf, recall)
    # a brand-new user with three items of cluster c gets cold items of cluster c
    c = int(cold_cl[0])
    hist = log[log["user"].isin(np.flatnonzero(pref == c)[:1])]["item"].to_numpy()[:3]
    st = m2.adapt(list(hist))
    r = m2.recommend(st, k=5, candidates=cold_ids)
    hit = np.isin(r.ids, cold_ids[cold_cl == c]).mean()
    assert hit >= 0.6, hit
    # full ranking: cold items compete with the trained catalogue and do get recommended
    full = m2.recommend(list(range(50)), k=20)
    assert np.isin(full.ids, cold_ids).any()


def test_add_items_is_pure_and_keeps_existing_scores(syn):
    model, _, tr, cold, pref, cold_cl, tr_cl = syn
    users = list(range(12))
    before = model.recommend(users, k=10)
    m2 = model.add_items(cold)
    after = model.recommend(users, k=10)
    assert before.ids.tobytes() == after.ids.tobytes() and before.scores.tobytes() == after.scores.tobytes()
    assert model.n_items == len(tr) and m2.n_items == len(tr) + len(cold)
    assert m2 is not model and m2._net is not model._net
    np.testing.assert_array_equal(m2.item_ids, np.concatenate([tr.index.to_numpy(), cold.index.to_numpy()]))
    # at the same unadapted state, existing items score exactly as before (the new ones are
    # only extra candidates; adaptation steps, a softmax over the catalogue, do see them)
    old_ids = tr.index.to_numpy()
    for u in users:
        sa, sb = model.user_state(u, steps=0), m2.user_state(u, steps=0)
        np.testing.assert_allclose(sa.vector, sb.vector, rtol=1e-5, atol=1e-6)
        a = model.recommend(sa, k=10, candidates=old_ids)
        b = m2.recommend(sa, k=10, candidates=old_ids)
        np.testing.assert_array_equal(a.ids, b.ids)
        np.testing.assert_allclose(a.scores, b.scores, rtol=1e-5, atol=1e-5)
    N, M = model.n_items, len(cold)
    net2 = m2._net
    assert torch.all(net2.emb_in[N:N + M] == 0) and torch.all(net2.emb_out[N:N + M] == 0)  # id rows absent
    torch.testing.assert_close(net2.emb_in[N + M:], model._net.emb_in[N:], rtol=0, atol=0)
    assert np.all(m2._item_count[N:] == 0)
    assert torch.allclose(net2.item_bias[N:], model._net.item_bias.mean().expand(M))
    if net2.has_wide:
        assert torch.all(net2.wide[N:] == 0) and torch.all(net2.wide[:, N:] == 0)
        torch.testing.assert_close(net2.wide[:N, :N], model._net.wide, rtol=0, atol=0)
    # a new item's vector is its features alone: feature rows + dense projection
    j = N + 3
    rows = net2.feat_indices[net2.feat_offsets[j]:net2.feat_offsets[j + 1]]
    assert int(rows[0]) == j and (rows[1:] >= N + M).all() and len(rows) == 2  # id row + "kind=k?"
    name = m2._feature_names[int(rows[1]) - N - M]
    assert name == f"kind={cold['kind'].iloc[3]}"
    # evaluate (full ranking) counts the cold items: each user's test items are the cold
    # items of their cluster
    test = pd.DataFrame([(u, i) for u in range(len(pref)) for i in cold.index[cold_cl == pref[u]]],
                        columns=["user", "item"])
    ev = m2.evaluate(test, k=10)
    assert ev["hit@10"] > 0.05, ev
    # in the full ranking, a user's cold items of their cluster rank above the trained items
    # of the other clusters (the cold items' scores are on the scale of the trained ones)
    tr_ids = tr.index.to_numpy()
    auc = []
    for u in range(60):
        r = m2.recommend(u, k=m2.n_items)
        rank = {x: i for i, x in enumerate(r.ids[r.valid].tolist())}
        cin = np.array([rank[x] for x in cold.index[cold_cl == pref[u]]])
        wout = np.array([rank[x] for x in tr_ids[tr_cl != pref[u]] if x in rank])
        if len(cin):
            auc.append((cin[:, None] < wout[None, :]).mean())
    assert np.mean(auc) > 0.9, np.mean(auc)


def test_add_items_errors_are_named(syn):
    model, _, tr, cold, *_ = syn
    with pytest.raises(ValueError, match=r"already in the catalogue.*1001"):
        model.add_items(tr.iloc[[1]])
    with pytest.raises(TypeError, match="integers"):
        model.add_items(cold.set_axis([f"s{i}" for i in range(len(cold))]))
    with pytest.raises(TypeError, match="DataFrame"):
        model.add_items([1, 2])
    with pytest.raises(ValueError, match="empty"):
        model.add_items(cold.iloc[:0])
    with pytest.raises(ValueError, match="duplicate"):
        model.add_items(pd.concat([cold.iloc[:2], cold.iloc[:1]]))
    bad = cold.iloc[:3].copy()
    bad.at[cold.index[2], "emb"] = np.ones(4, np.float32)
    with pytest.raises(ValueError, match=rf"'emb'.*{cold.index[2]}"):
        model.add_items(bad)


def test_categorical_only_cold_items_and_unknown_values():
    rng = np.random.default_rng(1)
    genres = ["a", "b", "c", "d"]
    gi = rng.integers(4, size=60)
    rows = []
    for u in range(120):
        g = u % 4
        pool = np.flatnonzero(gi == g)
        rows += [(f"u{u}", f"i{i}", t) for t, i in enumerate(rng.choice(pool, size=6, replace=False))]
    log = pd.DataFrame(rows, columns=["user", "item", "timestamp"])
    items = pd.DataFrame({"genre": [genres[g] for g in gi]}, index=[f"i{i}" for i in range(60)])
    model = rm.train(log, items=items, config=dict(CFG, epochs=8))
    new = pd.DataFrame({"genre": ["a", "b", "c", "d", "zzz"], "other": 1}, index=["n0", "n1", "n2", "n3", "n4"])
    m2 = model.add_items(new)
    N = model.n_items
    off, idx = m2._net.feat_offsets.numpy(), m2._net.feat_indices.numpy()
    assert list(idx[off[N + 4]:off[N + 5]]) == [N + 4]  # unknown genre: no feature row
    cand = new.index.tolist()
    hits = 0
    for u in range(120):
        r = m2.recommend(f"u{u}", k=1, candidates=cand)
        hits += r.ids[0] == f"n{u % 4}"
    assert hits / 120 > 0.7, hits  # chance: 0.2
    # explanations name the cold item's feature
    r = m2.recommend("u0", k=1, candidates=["n0"], explain=True)
    assert r.explanations[0]["features"][0][0] == "genre=a"


def test_save_load_round_trip_with_dense_features(syn, tmp_path):
    model, _, _, cold, *_ = syn
    for m, name in ((model, "a"), (model.add_items(cold), "b")):
        p = tmp_path / f"{name}.recmeta"
        m.save(p)
        loaded = rm.load(p)
        assert loaded._item_schema == m._item_schema
        assert json.dumps(loaded._item_schema, sort_keys=True) == json.dumps(m._item_schema, sort_keys=True)
        sd, sl = m._net.state_dict(), loaded._net.state_dict()
        assert set(sd) == set(sl) and "item_dense" in sd and "item_dense_proj" in sd
        for k in sd:
            assert sd[k].dtype == sl[k].dtype and sd[k].numpy().tobytes() == sl[k].numpy().tobytes(), k
        users = list(range(15))
        a, b = m.recommend(users, k=10), loaded.recommend(users, k=10)
        assert a.ids.tobytes() == b.ids.tobytes() and a.scores.tobytes() == b.scores.tobytes()
        ea = m.recommend(3, k=3, explain=True).explanations
        eb = loaded.recommend(3, k=3, explain=True).explanations
        assert ea == eb and any(f[0] == "emb (dense)" for e in ea for f in e["features"])
    # a file whose dense matrix does not match its schema is rejected
    tensors, meta = read_model_file(p)
    bad = dict(tensors)
    bad["net.item_dense"] = tensors["net.item_dense"][:, :5].contiguous()
    q = tmp_path / "bad.recmeta"
    write_model_file(q, bad, {k: v for k, v in meta.items() if k not in ("sha256", "format", "format_version")})
    with pytest.raises(ModelFileError, match="item_dense"):
        rm.load(q)
    del bad["net.item_dense"]
    write_model_file(q, bad, {k: v for k, v in meta.items() if k not in ("sha256", "format", "format_version")})
    with pytest.raises(ModelFileError, match="item_dense"):
        rm.load(q)


def test_models_without_dense_features_keep_their_tensors():
    log, tr, *_ = clustered(n_users=30)
    model = rm.train(log, items=tr.drop(columns=["emb"]), config=dict(CFG, epochs=1))
    sd = model._net.state_dict()
    assert "item_dense" not in sd and "item_dense_proj" not in sd and model._net.n_dense == 0


# ------------------------------------------------------------------------- text extra

class HashEncoder:
    """A deterministic stand-in for a sentence model: hashed character trigrams."""

    def __init__(self, dim=32):
        self.dim = dim
        self.calls = []

    def encode(self, texts):
        self.calls.append(len(texts))
        out = np.zeros((len(texts), self.dim), np.float64)
        for i, t in enumerate(texts):
            s = f"  {t.lower()} "
            for j in range(len(s) - 2):
                h = int.from_bytes(hashlib.blake2b(s[j:j + 3].encode(), digest_size=4).digest(), "little")
                out[i, h % self.dim] += 1.0 if (h >> 16) & 1 else -1.0
        return out


def test_embed_texts_with_a_host_encoder():
    from recmeta_sdk.data.text import embed_texts

    enc = HashEncoder()
    texts = ["Toy Story", "Toy Story 2", "GoldenEye", None, ""]
    e = embed_texts(texts, encoder=enc, batch_size=2)
    assert e.shape == (5, 32) and e.dtype == np.float32 and e.flags["C_CONTIGUOUS"]
    assert enc.calls == [2, 2, 1]
    np.testing.assert_allclose(np.linalg.norm(e[:3], axis=1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(e[3], e[4])  # None embeds as ""
    np.testing.assert_array_equal(e, embed_texts(texts, encoder=HashEncoder(), batch_size=100))
    raw = embed_texts(texts[:3], encoder=HashEncoder(), normalize=False)
    np.testing.assert_array_equal(raw, HashEncoder().encode(["Toy Story", "Toy Story 2", "GoldenEye"]).astype(np.float32))
    assert e[0] @ e[1] > e[0] @ e[2]  # shared trigrams
    assert embed_texts([], encoder=HashEncoder()).shape == (0, 32)
    with pytest.raises(TypeError, match="single string"):
        embed_texts("Toy Story", encoder=enc)
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        embed_texts(["a", 3], encoder=enc)
    with pytest.raises(ValueError, match="batch_size"):
        embed_texts(["a"], encoder=enc, batch_size=0)
    with pytest.raises(TypeError, match="encode"):
        embed_texts(["a"], encoder=object())

    class Bad:
        def encode(self, texts):
            return np.full((len(texts), 3), np.nan)

    with pytest.raises(ValueError, match="non-finite"):
        embed_texts(["a"], encoder=Bad())

    class Short:
        def encode(self, texts):
            return np.ones((1, 3))

    with pytest.raises(ValueError, match="shape"):
        embed_texts(["a", "b"], encoder=Short())


def test_embed_texts_without_sentence_transformers_names_the_extra(monkeypatch):
    from recmeta_sdk.data import text

    monkeypatch.setitem(sys.modules, "sentence_transformers", None)  # import fails
    monkeypatch.setattr(text, "_models", {})
    with pytest.raises(ImportError, match=r"extra 'text'.*recmeta\[text\]"):
        text.embed_texts(["a title"])


def test_text_embeddings_as_dense_item_features_end_to_end():
    """Titles embedded by a host encoder become a dense feature; a new item whose title
    shares words with a cluster's titles is recommended to that cluster's users."""
    from recmeta_sdk.data.text import embed_texts

    rng = np.random.default_rng(3)
    words = [["space", "alien", "rocket", "galaxy"], ["love", "wedding", "kiss", "heart"],
             ["murder", "detective", "crime", "police"]]
    titles, topic = [], []
    for i in range(90):
        t = i % 3
        titles.append(" ".join(rng.choice(words[t], size=2, replace=False)) + f" {i}")
        topic.append(t)
    topic = np.array(topic)
    rows = []
    for u in range(150):
        pool = np.flatnonzero(topic == u % 3)
        rows += [(u, i, s) for s, i in enumerate(rng.choice(pool, size=8, replace=False))]
    log = pd.DataFrame(rows, columns=["user", "item", "timestamp"])
    enc = HashEncoder(48)
    items = pd.DataFrame({"title_vec": list(embed_texts(titles, encoder=enc))}, index=np.arange(90))
    model = rm.train(log, items=items, config=dict(CFG, epochs=8))
    new_titles = ["rocket galaxy", "heart kiss", "police detective"]
    new = pd.DataFrame({"title_vec": list(embed_texts(new_titles, encoder=enc))}, index=[900, 901, 902])
    m2 = model.add_items(new)
    hits = sum(int(m2.recommend(u, k=1, candidates=[900, 901, 902]).ids[0]) == 900 + u % 3 for u in range(150))
    assert hits / 150 > 0.8, hits  # chance: 1/3


def test_add_items_carries_online_feedback_and_accepts_feedback_on_new_items(syn):
    from recmeta_sdk import online

    model, _, tr, cold, *_ = syn
    m = model.add_items(cold.iloc[:5])  # a private copy: feedback does not touch the fixture
    m.feedback([{"user": 7, "item": int(tr.index[0]), "reward": 1.0}])
    before = online.current(m, 7).state.vector
    m2 = m.add_items(cold.iloc[5:10])
    assert m2._online_store is not m._online_store
    st = online.current(m2, 7)
    assert st is not None and len(online.store(m2).log()) == 1
    np.testing.assert_allclose(st.state.base, online.current(m, 7).state.base, rtol=1e-5, atol=1e-6)
    assert before.shape == st.state.vector.shape
    # feedback on a cold item is accepted by the new model, refused by the old one
    m2.feedback([{"user": 7, "item": int(cold.index[7]), "reward": 1.0}])
    assert int(cold.index[7]) in online.current(m2, 7).state.history_ids
    with pytest.raises(ValueError, match=str(int(cold.index[7]))):
        m.feedback([{"user": 7, "item": int(cold.index[7]), "reward": 1.0}])


def test_resume_learns_the_id_rows_of_added_items(syn):
    model, _, _, cold, *_ = syn
    m2 = model.add_items(cold.iloc[:10])
    N = model.n_items
    new_ids = cold.index[:10].to_numpy()
    events = [{"user": u, "item": int(i), "reward": 1.0, "propensity": 0.1, "timestamp": float(t)}
              for u in range(40) for t, i in enumerate(new_ids[(u % 5) * 2:(u % 5) * 2 + 2])]
    m2.feedback(events)
    m3 = rm.train(None, resume=m2, config={"epochs": 2})
    assert m3.n_items == m2.n_items
    assert m3._net.emb_out[N:N + 10].abs().sum(1).min() > 0  # the id rows moved away from zero
    assert torch.all(m2._net.emb_out[N:N + 10] == 0)  # m2 unchanged


def test_add_items_without_item_features_warns_and_gives_zero_vectors(caplog):
    log, *_ = clustered(n_users=30)
    model = rm.train(log, config=dict(CFG, epochs=1))
    with caplog.at_level("WARNING", logger="recmeta"):
        m2 = model.add_items(pd.DataFrame({"title": ["x", "y"]}, index=[5000, 5001]))
    assert "feature-less" in caplog.text
    assert torch.all(m2._V[model.n_items:] == 0) and torch.all(m2._X[model.n_items:] == 0)
    r = m2.recommend(0, k=2, candidates=[5000, 5001])
    assert r.valid.all() and r.scores[0] == r.scores[1]
