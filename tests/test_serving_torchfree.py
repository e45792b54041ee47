"""Torch-free serving (recmeta_sdk.serving): a model saved with serving=True serves its known
users without torch, with the same ids and scores as the full model."""
from __future__ import annotations

import textwrap

import numpy as np
import pandas as pd
import pytest

import recmeta_sdk as rm
from recmeta_sdk import serving
from recmeta_sdk.model.io import ModelFileError, read_model_arrays, write_model_file
from _helpers import run_package_child  # noqa: E402


def _log(seed: int, str_ids: bool) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    n = 700
    users = rng.integers(0, 45, n)
    items = rng.zipf(1.4, n) % 67 + 100
    log = pd.DataFrame({"user": users, "item": items, "timestamp": rng.permutation(n)})
    log = log.drop_duplicates(["user", "item"]).reset_index(drop=True)
    if str_ids:
        log["user"] = "u" + log["user"].astype(str)
        log["item"] = "i" + log["item"].astype(str)
    return log


CASES = {
    "wide-int": ({"epochs": 2, "dim": 16}, False),
    "wide-recency-str": ({"epochs": 2, "dim": 12, "wide_recency": 0.7, "wide_recency_decay": 0.2}, True),
    "deep-only": ({"epochs": 2, "dim": 8, "wide": "none"}, False),
    # the sparse wide part (item neighbourhoods, forced by a tiny budget), with recency weights
    "sparse-wide": ({"epochs": 2, "dim": 8, "wide_budget_bytes": 1, "wide_neighbours": 7, "wide_recency": 0.7,
                     "wide_recency_decay": 0.2}, False),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def saved(request, tmp_path_factory):
    cfg, str_ids = CASES[request.param]
    log = _log(len(request.param), str_ids)
    model = rm.train(log, config=cfg)
    path = tmp_path_factory.mktemp("serving") / f"{request.param}.recmeta"
    model.save(path, serving=True)
    return model, path, log


def test_same_ids_and_scores_as_the_full_model(saved):
    model, path, log = saved
    sm = serving.load(path)
    assert (sm.n_items, sm.dim) == (model.n_items, model.dim)
    users = [u.item() if hasattr(u, "item") else u for u in model.user_ids]
    items = model.item_ids.tolist()
    options = [{}, {"exclude_seen": False}, {"exclude": items[3:9]}, {"candidates": items[::3]},
               {"popularity_penalty": 0.4}, {"temperature": 0.37}, {"k": model.n_items + 5}]
    for kw in options:
        kw = dict({"k": 7}, **kw)
        a, b = model.recommend(users, **kw), sm.recommend(users, **kw)
        np.testing.assert_array_equal(a.ids, b.ids, err_msg=str(kw))
        np.testing.assert_array_equal(a.scores, b.scores, err_msg=str(kw))
        np.testing.assert_array_equal(a.valid, b.valid, err_msg=str(kw))
        one = sm.recommend(users[5], **kw)
        np.testing.assert_array_equal(one.ids, b.ids[5])
        np.testing.assert_array_equal(one.scores, b.scores[5])
    # the training history is excluded by default
    u = users[0]
    hist = set(log.loc[log["user"] == u, "item"].tolist())
    assert not hist & set(sm.recommend(u, k=10).ids.tolist())


def test_refusals_name_the_bad_value(saved):
    model, path, _ = saved
    sm = serving.load(path)
    with pytest.raises(ValueError, match="unknown user 'nobody'"):
        sm.recommend("nobody")
    with pytest.raises(ValueError, match="k must be a positive int"):
        sm.recommend(model.user_ids[0].item() if hasattr(model.user_ids[0], "item") else model.user_ids[0], k=0)
    u = model.user_ids[0]
    u = u.item() if hasattr(u, "item") else u
    with pytest.raises(ValueError, match="unknown to the model"):
        sm.recommend(u, exclude=["no-such-item"])
    with pytest.raises(ValueError, match="temperature"):
        sm.recommend(u, temperature=float("nan"))
    with pytest.raises(ValueError, match="popularity_penalty"):
        sm.recommend(u, popularity_penalty=-1.0)
    with pytest.raises(TypeError, match="user id"):
        sm.recommend({"a": 1})
    assert sm.known(u) and not sm.known("nobody") and not sm.known(None)


def test_full_model_from_the_same_file(saved):
    model, path, _ = saved
    sm = serving.load(path)
    full = rm.load(sm.path)
    users = [u.item() if hasattr(u, "item") else u for u in model.user_ids]
    for kw in ({"k": 5}, {"k": 9, "exclude_seen": False, "popularity_penalty": 0.2}):
        a, b = full.recommend(users, **kw), sm.recommend(users, **kw)
        np.testing.assert_array_equal(a.ids, b.ids)
        np.testing.assert_array_equal(a.scores, b.scores)
    # the full model serves the saved states (the base state too, where online updates start)
    v = sm._states[1]
    st = full.user_state(users[1])
    np.testing.assert_array_equal(st.vector, v)
    np.testing.assert_array_equal(st.base, model.user_state(users[1]).base)
    # re-saving without serving drops the section; serving.load then says how to get one
    p2 = path.with_name(path.stem + "-plain.recmeta")
    full.save(p2)
    with pytest.raises(ModelFileError, match="serving=True"):
        serving.load(p2)


def test_no_torch_is_imported(saved, tmp_path):
    model, path, _ = saved
    u = model.user_ids[2]
    u = u.item() if hasattr(u, "item") else u
    code = textwrap.dedent(f"""
        import sys
        from recmeta_sdk import serving
        m = serving.load({str(path)!r})
        r = m.recommend({u!r}, k=5)
        assert r.ids.shape == (5,), r
        print("torch" in sys.modules)
    """)
    out = run_package_child(code, tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False", out.stdout


def _rewrite(src, dst, change):
    arrays, meta = read_model_arrays(src)
    meta = {k: v for k, v in meta.items() if k not in ("format", "format_version", "sha256", "library_version",
                                                       "torch_version")}
    change(arrays, meta)
    write_model_file(dst, arrays, meta)


def _nan_state(a, m):
    a["serving.user_states"] = a["serving.user_states"].copy()
    a["serving.user_states"][3, 1] = np.nan


def _short_table(a, m):
    a["serving.item_table"] = a["serving.item_table"][:-1].copy()


def _bad_version(a, m):
    m["serving"] = {"version": 99}


def _no_section(a, m):
    m.pop("serving")


def _extra(a, m):
    a["serving.extra"] = np.zeros(3, np.float32)


def _short_alpha(a, m):
    if "serving.wide_alpha" in a:
        a["serving.wide_alpha"] = a["serving.wide_alpha"][:1].copy()
    else:
        a["serving.wide_alpha"] = np.ones(4, np.float32)  # without a wide part: refused too


@pytest.mark.parametrize("change, message", [
    (_nan_state, "serving.user_states holds nan"),
    (_short_table, "serving.item_table has shape"),
    (_bad_version, "serving section version 99"),
    (_extra, r"unexpected tensors \['serving.extra'\]"),
    (_short_alpha, "serving.wide_alpha"),
])
def test_inconsistent_serving_sections_are_refused_by_both_loaders(saved, tmp_path, change, message):
    _, path, _ = saved
    bad = tmp_path / "bad.recmeta"
    _rewrite(path, bad, change)
    with pytest.raises(ModelFileError, match=message):
        serving.load(bad)
    with pytest.raises(ModelFileError, match=message):
        rm.load(bad)


def test_serving_tensors_without_the_entry_are_refused(saved, tmp_path):
    _, path, _ = saved
    bad = tmp_path / "bad.recmeta"
    _rewrite(path, bad, _no_section)
    with pytest.raises(ModelFileError, match="serving=True"):
        serving.load(bad)
    with pytest.raises(ModelFileError, match="malformed serving entry"):
        rm.load(bad)


def test_save_serving_flag_is_checked(saved, tmp_path):
    model, _, _ = saved
    with pytest.raises(TypeError, match="serving must be True or False"):
        model.save(tmp_path / "x.recmeta", serving="yes")
