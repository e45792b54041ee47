"""Model files: round trip, tamper and truncation rejected, atomic writes, no pickle."""
import json
import os
import pickle
import struct

import numpy as np
import pandas as pd
import pytest

import recmeta_sdk as rm
from recmeta_sdk.io import ModelFileError

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
    meta["config"]["temperature"] = 0.5  # a different model with the old hash
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
