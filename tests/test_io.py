"""Model files: round trip, tamper and truncation rejected, atomic writes, no pickle."""
import json
import os
import pickle
import struct

import numpy as np
import pandas as pd
import pytest

import recmeta_sdk as rm
from recmeta_sdk.model.io import ModelFileError

pytestmark = pytest.mark.usefixtures("one_torch_thread")



@pytest.fixture(scope="module")
def model():
    rng = np.random.default_rng(3)
    rows = [(u, int(i), t, float(rng.integers(1, 6))) for u in range(40)
            for t, i in enumerate(rng.choice(29, size=7, replace=False))]
    log = pd.DataFrame(rows, columns=["user", "item", "timestamp", "reward"])
    items = pd.DataFrame({"genres": ["a|b" if i % 2 else "c" for i in range(29)],
                          "release_year": [1950 + 3 * i for i in range(29)]}, index=pd.Index(range(29), name="item"))
    users = pd.DataFrame({"gender": ["M" if u % 2 else "F" for u in range(40)]}, index=pd.Index(range(40), name="user"))
    return rm.train(log, users=users, items=items,
                    config={"dim": 8, "hidden": 8, "seq_len": 3, "epochs": 2, "heads": 2})


def test_round_trip_is_bit_identical(model, tmp_path):
    p = tmp_path / "m.recmeta"
    model.save(p)
    loaded = rm.load(p)
    assert isinstance(loaded, rm.Recommender)
    users = list(range(10))
    a, b = model.recommend(users, k=8), loaded.recommend(users, k=8)
    np.testing.assert_array_equal(a.ids, b.ids)
    assert a.scores.tobytes() == b.scores.tobytes()
    sa = model.adapt({"item": [1, 2, 3], "reward": [5, 1, 4]}, features={"gender": "F"})
    sb = loaded.adapt({"item": [1, 2, 3], "reward": [5, 1, 4]}, features={"gender": "F"})
    assert sa.vector.tobytes() == sb.vector.tobytes()
    e1 = model.recommend(sa, k=4, explore="sample", seed=9)
    e2 = loaded.recommend(sb, k=4, explore="sample", seed=9)
    assert e1.propensities.tobytes() == e2.propensities.tobytes()
    assert loaded.config == model.config
    np.testing.assert_array_equal(loaded.item_ids, model.item_ids)
    # the file is a plain safetensors file with our metadata
    from safetensors import safe_open

    with safe_open(str(p), "pt") as f:
        meta = json.loads(f.metadata()["recmeta"])
    assert meta["format"] == "recmeta-model" and len(meta["sha256"]) == 64


def test_atomic_overwrite_leaves_no_temp_files(model, tmp_path):
    p = tmp_path / "m.recmeta"
    p.write_bytes(b"old")
    model.save(p)
    model.save(p)
    assert sorted(os.listdir(tmp_path)) == ["m.recmeta"]
    with pytest.raises(ValueError, match="does not exist"):
        model.save(tmp_path / "missing" / "m.recmeta")


def _header_len(blob):
    return struct.unpack("<Q", blob[:8])[0]


def test_tampered_data_is_rejected(model, tmp_path):
    p = tmp_path / "m.recmeta"
    model.save(p)
    blob = bytearray(p.read_bytes())
    start = 8 + _header_len(blob)
    for pos in (start, start + (len(blob) - start) // 2, len(blob) - 1):
        bad = bytearray(blob)
        bad[pos] ^= 0x01
        q = tmp_path / "bad.recmeta"
        q.write_bytes(bytes(bad))
        with pytest.raises(ModelFileError, match="SHA-256"):
            rm.load(q)


def test_tampered_metadata_is_rejected(model, tmp_path):
    p = tmp_path / "m.recmeta"
    model.save(p)
    blob = p.read_bytes()
    n = _header_len(blob)
    header = json.loads(blob[8:8 + n])
    meta = json.loads(header["__metadata__"]["recmeta"])
    meta["config"]["temperature"] = 2 * meta["config"]["temperature"] + 0.25  # a different model, the old hash
    header["__metadata__"]["recmeta"] = json.dumps(meta)
    h = json.dumps(header).encode()
    q = tmp_path / "bad.recmeta"
    q.write_bytes(struct.pack("<Q", len(h)) + h + blob[8 + n:])
    with pytest.raises(ModelFileError, match="SHA-256"):
        rm.load(q)
    # a future format version is refused before anything else
    meta["format_version"] = 99
    header["__metadata__"]["recmeta"] = json.dumps(meta)
    h = json.dumps(header).encode()
    q.write_bytes(struct.pack("<Q", len(h)) + h + blob[8 + n:])
    with pytest.raises(ModelFileError, match="format_version"):
        rm.load(q)
    # a shape that does not match its byte range
    meta["format_version"] = 1
    header["__metadata__"]["recmeta"] = json.dumps(meta)
    name = next(k for k in header if k != "__metadata__")
    header[name]["shape"] = [s + 1 for s in header[name]["shape"]] or [2]
    h = json.dumps(header).encode()
    q.write_bytes(struct.pack("<Q", len(h)) + h + blob[8 + n:])
    with pytest.raises(ModelFileError, match="does not fit"):
        rm.load(q)


@pytest.mark.parametrize("keep", [0, 5, 8, 100, -1])
def test_truncated_file_is_rejected(model, tmp_path, keep):
    p = tmp_path / "m.recmeta"
    model.save(p)
    blob = p.read_bytes()
    q = tmp_path / "cut.recmeta"
    q.write_bytes(blob[:keep] if keep >= 0 else blob[:-1])
    with pytest.raises(ModelFileError):
        rm.load(q)


def test_huge_header_length_is_rejected_before_reading(tmp_path):
    q = tmp_path / "huge.recmeta"
    q.write_bytes(struct.pack("<Q", 2**62) + b"{}")
    with pytest.raises(ModelFileError, match="header length"):
        rm.load(q)
    q.write_bytes(struct.pack("<Q", 2) + b"{}")
    with pytest.raises(ModelFileError, match="not a recmeta model file"):
        rm.load(q)
    with pytest.raises(FileNotFoundError):
        rm.load(tmp_path / "nothing.recmeta")
    assert issubclass(ModelFileError, ValueError)


def test_loading_never_unpickles(model, tmp_path, monkeypatch):
    p = tmp_path / "m.recmeta"
    model.save(p)

    def forbidden(*a, **k):
        raise AssertionError("unpickling during load")

    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    import torch

    monkeypatch.setattr(torch, "load", forbidden)
    loaded = rm.load(p)
    np.testing.assert_array_equal(loaded.recommend(3, k=5).ids, model.recommend(3, k=5).ids)


# ---------------------------------------------------------------------------- feedback log

def _with_feedback(model, users=(3, 7, "new-a", "new-b", 1001)):
    """A copy of ``model`` (same weights) with feedback from known and new users (int and str
    ids), with missing propensities and timestamps."""
    from recmeta_sdk import online

    m = rm.Recommender(model._net, model.config, model.item_ids, model.user_ids, model._hist_offsets,
                       model._hist_items, model._hist_rewards, model._item_count, model._item_schema,
                       model._user_schema, model._uf_off, model._uf_idx, model._reward_scale)
    online.store(m, update="readapt")
    rng = np.random.default_rng(11)
    events = []
    for u in users:
        for t, i in enumerate(rng.choice(29, size=4, replace=False)):
            events.append({"user": u, "item": int(i), "reward": float(rng.integers(0, 2) if t else 1.0),
                           "propensity": float(rng.uniform(0.05, 1.0)), "timestamp": 100.0 + t, "position": t % 3})
        events.append({"user": u, "item": int((t + 7) % 29), "reward": 1.0, "propensity": 0.5})  # no timestamp
    m.feedback(events)
    return m


def test_feedback_log_round_trips_and_resume_sees_it(model, tmp_path):
    from recmeta_sdk import online

    m = _with_feedback(model)
    p = tmp_path / "m.recmeta"
    m.save(p)
    loaded = rm.load(p)
    a, b = online.feedback_log(m), online.feedback_log(loaded)
    assert len(a) == 25 and list(b.columns) == list(online.EVENT_COLUMNS)
    assert b["user"].tolist() == a["user"].tolist()
    assert [type(x) for x in b["user"]] == [type(x) for x in a["user"]]  # 3 stays int, "new-a" str
    assert b["item"].tolist() == a["item"].tolist()
    for col in ("reward", "propensity", "timestamp"):
        np.testing.assert_array_equal(b[col].to_numpy(np.float64), a[col].to_numpy(np.float64))  # NaN kept
    assert b["position"].tolist() == a["position"].tolist()
    assert np.isnan(b["timestamp"].to_numpy(np.float64)).sum() == 5
    st = online.store(loaded)
    assert (st.encode, st.update) == ("positive", "readapt")
    # the users' online states are rebuilt from the log: same state as before saving
    for u in (3, "new-b", 1001):
        ca, cb = online.current(m, u), online.current(loaded, u)
        assert cb.version == ca.version == 5
        np.testing.assert_allclose(cb.state.vector, ca.state.vector, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(cb.seen, ca.seen)
    # a model saved again after more feedback carries the longer log
    loaded.feedback([(3, 5, 1.0, 0.25, 200.0, 0)])
    loaded.save(p)
    assert len(online.feedback_log(rm.load(p))) == 26


def test_resume_from_a_loaded_model_sees_the_same_log(model, tmp_path):
    import torch

    from recmeta_sdk import online

    m = _with_feedback(model, users=(3, 7, 1001, 1002))
    p = tmp_path / "m.recmeta"
    m.save(p)
    loaded = rm.load(p)
    # train(..., resume=) on the loaded model learns from the same log: the same update
    cfg = {"epochs": 2, "batch_size": 4}
    ra = rm.train(None, resume=m, config=cfg, progress=False)
    rb = rm.train(None, resume=loaded, config=cfg, progress=False)
    sa, sb = ra._net.state_dict(), rb._net.state_dict()
    assert not torch.equal(sa["emb_out"], m._net.state_dict()["emb_out"])  # it did learn
    for k, v in sa.items():
        assert torch.equal(v, sb[k]), k
    assert len(online.feedback_log(rb)) == 20


def test_model_without_feedback_has_no_log_and_old_files_load(model, tmp_path, monkeypatch):
    from recmeta_sdk import online
    from recmeta_sdk.model import io

    p = tmp_path / "m.recmeta"
    model.save(p)
    from safetensors import safe_open

    with safe_open(str(p), "pt") as f:
        meta = json.loads(f.metadata()["recmeta"])
        names = list(f.keys())
    assert meta["format_version"] == io.FORMAT_VERSION == 3 and "feedback" not in meta
    assert not [n for n in names if n.startswith("feedback.")]
    # a file of format 1 (written before the log was saved) still loads, with an empty log
    from _model_file_formats import legacy_blob, to_legacy

    p.write_bytes(legacy_blob(*to_legacy(*io.read_model_file(p)), version=1))
    with safe_open(str(p), "pt") as f:
        assert json.loads(f.metadata()["recmeta"])["format_version"] == 1
    old = rm.load(p)
    assert len(online.feedback_log(old)) == 0
    np.testing.assert_array_equal(old.recommend(3, k=5).ids, model.recommend(3, k=5).ids)


def test_tampered_feedback_log_is_rejected(model, tmp_path):
    from safetensors import safe_open

    from recmeta_sdk.model import io

    m = _with_feedback(model)
    p = tmp_path / "m.recmeta"
    m.save(p)
    blob = p.read_bytes()
    n = _header_len(blob)
    header = json.loads(blob[8:8 + n])
    # flip one bit inside the rewards of the log
    lo, hi = header["feedback.reward"]["data_offsets"]
    bad = bytearray(blob)
    bad[8 + n + lo + (hi - lo) // 2] ^= 0x10
    q = tmp_path / "bad.recmeta"
    q.write_bytes(bytes(bad))
    with pytest.raises(ModelFileError, match="SHA-256"):
        rm.load(q)
    # rename a user of the log (its UTF-8 bytes, a tensor since format 3), keeping the old hash
    lo, hi = header["lists.feedback_users.utf8"]["data_offsets"]
    bad = bytearray(blob)
    bad[8 + n + lo] = ord("N") if blob[8 + n + lo] != ord("N") else ord("M")
    q.write_bytes(bytes(bad))
    with pytest.raises(ModelFileError, match="SHA-256"):
        rm.load(q)
    # the same in the metadata of a format-2 file
    from _model_file_formats import legacy_blob, to_legacy

    t2, m2 = to_legacy(*io.read_model_file(p))
    legacy = legacy_blob(t2, m2)
    n2 = _header_len(legacy)
    header = json.loads(legacy[8:8 + n2])
    meta = json.loads(header["__metadata__"]["recmeta"])
    assert isinstance(meta["feedback"]["users"], list)
    meta["feedback"]["users"][0] = "someone-else"
    header["__metadata__"]["recmeta"] = json.dumps(meta)
    h = json.dumps(header).encode()
    q.write_bytes(struct.pack("<Q", len(h)) + h + legacy[8 + n2:])
    with pytest.raises(ModelFileError, match="SHA-256"):
        rm.load(q)
    # drop the log's metadata (and its hash with it): the orphan tensors are refused
    with safe_open(str(p), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
        meta = json.loads(f.metadata()["recmeta"])
    meta = {k: v for k, v in meta.items() if k not in ("sha256", "format", "format_version")}
    io.write_model_file(q, {k: v for k, v in tensors.items() if not k.startswith("lists.feedback_users.")},
                        {k: v for k, v in meta.items() if k != "feedback"})
    with pytest.raises(ModelFileError, match="without feedback metadata"):
        rm.load(q)
    # a consistently hashed file whose log points outside the catalogue / the user list
    for name, value in (("feedback.item", 29), ("feedback.user", 5)):
        t2 = dict(tensors)
        t2[name] = tensors[name].clone()
        t2[name][0] = value
        io.write_model_file(q, t2, meta)
        with pytest.raises(ModelFileError, match="out of range"):
            rm.load(q)
    # a missing log column
    io.write_model_file(q, {k: v for k, v in tensors.items() if k != "feedback.position"}, meta)
    with pytest.raises(ModelFileError, match="feedback tensors"):
        rm.load(q)
