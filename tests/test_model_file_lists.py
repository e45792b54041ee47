"""Model-file format 3: the id maps and other long lists are tensors, the header is small and
its length is capped before it is read; files of format 1 and 2 still load; forged list
tensors are refused with ModelFileError naming the tensor."""
from __future__ import annotations

import json
import struct
import time

import numpy as np
import pandas as pd
import pytest
import torch

import recmeta_sdk as rm
from recmeta_sdk.model import io as rio
from recmeta_sdk import online
from recmeta_sdk.model.io import LoadLimits, ModelFileError

from _model_file_formats import legacy_blob, to_legacy

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CFG = {"dim": 8, "hidden": 8, "seq_len": 3, "epochs": 1, "heads": 2, "batch_size": 32}
# non-ASCII ids: 2-, 3- and 4-byte UTF-8 characters, a combining accent, an empty string
ITEM_NAMES = ["é", "电影", "🎬 film", "naïve", "e\u0301", "", "plain", "Ωmega", "ß", "a|b"] + [f"x{i}" for i in range(6)]


def _train(item_ids, user_ids, seed=5):
    rng = np.random.default_rng(seed)
    rows = [(u, item_ids[int(i)], t, float(rng.integers(1, 6))) for u in user_ids
            for t, i in enumerate(rng.choice(len(item_ids), size=5, replace=False))]
    log = pd.DataFrame(rows, columns=["user", "item", "timestamp", "reward"])
    items = pd.DataFrame({"tags": ["α|β" if j % 2 else "γ" for j in range(len(item_ids))]},
                         index=pd.Index(item_ids, name="item"))
    users = pd.DataFrame({"city": ["Zürich" if j % 2 else "東京" for j in range(len(user_ids))]},
                         index=pd.Index(user_ids, name="user"))
    return rm.train(log, users=users, items=items, progress=False, config=CFG)


@pytest.fixture(scope="module")
def int_model():
    return _train(list(range(100, 116)), [10**12 + u for u in range(24)])


@pytest.fixture(scope="module")
def str_model():
    return _train(ITEM_NAMES, [f"usér-{u}-用户" for u in range(24)])


def _header(p):
    raw = p.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return raw[8:8 + n]


def _copy(model):
    """A copy of ``model`` (same weights and lists, its own online store)."""
    return rm.Recommender(model._net, model.config, model.item_ids, model.user_ids, model._hist_offsets,
                          model._hist_items, model._hist_rewards, model._item_count, model._item_schema,
                          model._user_schema, model._uf_off, model._uf_idx, model._reward_scale)


def _same_model(a, b, users):
    np.testing.assert_array_equal(a.item_ids, b.item_ids)
    np.testing.assert_array_equal(a.user_ids, b.user_ids)
    assert a.item_ids.dtype == b.item_ids.dtype and a.user_ids.dtype == b.user_ids.dtype
    assert [type(x) for x in a.item_ids.tolist()] == [type(x) for x in b.item_ids.tolist()]
    assert a._item_schema == b._item_schema and a._user_schema == b._user_schema
    ra, rb = a.recommend(users, k=6), b.recommend(users, k=6)
    np.testing.assert_array_equal(ra.ids, rb.ids)
    assert ra.scores.tobytes() == rb.scores.tobytes()


@pytest.mark.parametrize("which", ["int", "str"])
def test_round_trip_keeps_ids_in_tensors_not_in_the_header(which, int_model, str_model, tmp_path):
    model = _copy(int_model if which == "int" else str_model)
    users = model.user_ids[:4].tolist()
    model.feedback([(users[0], model.item_ids[1].item() if which == "int" else model.item_ids[1], 1.0, 0.5, 1.0, 0),
                    ("nouveau-é", model.item_ids[2].item() if which == "int" else model.item_ids[2], 1.0, 0.5, 2.0, 0),
                    (7, model.item_ids[3].item() if which == "int" else model.item_ids[3], 0.0, 0.5, 3.0, 1)])
    p = tmp_path / "m.recmeta"
    model.save(p)
    tensors, meta = rio.read_model_file(p)
    assert meta["format_version"] == 3
    assert meta["item_ids"] == {"kind": which} and meta["user_ids"] == {"kind": which}
    assert meta["feedback"]["users"] == {"kind": "mixed"}
    assert "feature_names" not in meta
    if which == "int":
        assert tensors["lists.item_ids.int"].tolist() == model.item_ids.tolist()
        assert "lists.item_ids.utf8" not in tensors
    else:
        off = tensors["lists.item_ids.offsets"].tolist()
        raw = bytes(tensors["lists.item_ids.utf8"].numpy())
        assert [raw[a:b].decode() for a, b in zip(off[:-1], off[1:])] == model.item_ids.tolist()
        assert sorted(model.item_ids.tolist()) == sorted(ITEM_NAMES)
    head = _header(p)
    for v in model.user_ids.tolist()[:3] + ["Zürich", "nouveau-é"]:  # no id, no feature value in the header
        assert str(v).encode() not in head and json.dumps(str(v)).encode() not in head
    assert len(head) < 8192
    loaded = rm.load(p)
    _same_model(model, loaded, users)
    a, b = online.feedback_log(model), online.feedback_log(loaded)
    assert b["user"].tolist() == a["user"].tolist()
    assert [type(x) for x in b["user"]] == [type(x) for x in a["user"]]
    assert b["item"].tolist() == a["item"].tolist()


def test_old_format_files_still_load(str_model, int_model, tmp_path):
    """Files of format 1 and 2 (the lists in the metadata, written by the old writer's logic,
    non-ASCII as UTF-8 or as \\uXXXX escapes) load as the same model; saving writes format 3."""
    p = tmp_path / "m.recmeta"
    for model in (str_model, int_model):
        model.save(p)
        lt, lm = to_legacy(*rio.read_model_file(p))
        assert isinstance(lm["item_ids"]["values"], list) and not [k for k in lt if k.startswith("lists.")]
        for version, ensure_ascii in ((2, False), (2, True), (1, False)):
            m = {k: v for k, v in lm.items() if version > 1 or k not in ("feedback", "library_version",
                                                                          "torch_version")}
            t = {k: v for k, v in lt.items() if version > 1 or not k.startswith("feedback.")}
            p.write_bytes(legacy_blob(t, m, version=version, ensure_ascii=ensure_ascii))
            assert json.loads(json.loads(_header(p))["__metadata__"]["recmeta"])["format_version"] == version
            loaded = rm.load(p)
            _same_model(model, loaded, model.user_ids[:3].tolist())
            loaded.save(p)
            assert rio.read_model_file(p)[1]["format_version"] == 3
            _same_model(model, rm.load(p), model.user_ids[:3].tolist())
    # format 2 with a feedback log of int and non-ASCII string users
    model = _copy(str_model)
    model.feedback([(model.user_ids[0], model.item_ids[1], 1.0, 0.5, 1.0, 0), (5, model.item_ids[2], 1.0, 0.5, 2.0, 0),
                    ("nouvel-usager-é", model.item_ids[3], 0.0, 0.25, 3.0, 1)])
    model.save(p)
    lt, lm = to_legacy(*rio.read_model_file(p))
    assert lm["feedback"]["users"] == [model.user_ids[0], 5, "nouvel-usager-é"]
    p.write_bytes(legacy_blob(lt, lm, version=2))
    loaded = rm.load(p)
    a, b = online.feedback_log(model), online.feedback_log(loaded)
    assert b["user"].tolist() == a["user"].tolist() and b["item"].tolist() == a["item"].tolist()
    _same_model(model, loaded, model.user_ids[:3].tolist())


def test_header_over_the_cap_is_refused_before_it_is_read(int_model, tmp_path):
    """A valid file whose header is padded past 1 MiB (safetensors allows trailing spaces) is
    refused from its length prefix alone, naming the limit; a caller who raises the limit
    loads it (as a large file of format 1 or 2 needs)."""
    p = tmp_path / "m.recmeta"
    int_model.save(p)
    raw = p.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    for pad in (2**20 - n + 8, 16 * 2**20):  # just over 1 MiB, and 16 MiB
        head = raw[8:8 + n] + b" " * pad
        q = tmp_path / f"pad{pad}.recmeta"
        q.write_bytes(struct.pack("<Q", len(head)) + head + raw[8 + n:])
        t0 = time.perf_counter()
        with pytest.raises(ModelFileError, match=rf"header length {len(head)} exceeds max_header_bytes=1048576"):
            rm.load(q)
        assert time.perf_counter() - t0 < 0.05  # the length prefix alone: no read, no parse
        loaded = rm.load(q, limits=LoadLimits(max_header_bytes=len(head)))
        _same_model(int_model, loaded, int_model.user_ids[:2].tolist())
    assert rio.MAX_HEADER == LoadLimits().max_header_bytes == 2**20
    # exactly at the cap: read and parsed
    head = raw[8:8 + n] + b" " * (2**20 - n)
    q.write_bytes(struct.pack("<Q", len(head)) + head + raw[8 + n:])
    assert rm.load(q).n_items == int_model.n_items


def test_header_is_read_only_after_the_length_check(int_model, tmp_path, monkeypatch):
    """The cap holds before any byte of the header is read: a 16 MiB header of `[` is never parsed."""
    p = tmp_path / "m.recmeta"
    p.write_bytes(struct.pack("<Q", 16 * 2**20) + b"[" * (16 * 2**20))
    calls = []
    monkeypatch.setattr(rio, "_bounded_json", lambda *a, **k: calls.append(a) or {})
    with pytest.raises(ModelFileError, match="max_header_bytes"):
        rm.load(p)
    assert calls == []


def test_saving_a_header_over_the_cap_warns(int_model, tmp_path, caplog):
    p = tmp_path / "m.recmeta"
    tensors = {f"t{i:05d}": torch.zeros(1) for i in range(30_000)}  # ~ 55 bytes of header each
    with caplog.at_level("WARNING", logger="recmeta"):
        rio.write_model_file(p, tensors, {"x": 1})
    assert any("max_header_bytes" in r.getMessage() for r in caplog.records)
    with pytest.raises(ModelFileError, match="max_header_bytes"):
        rio.read_model_file(p)


# ---------------------------------------------------------------------------- forged lists

@pytest.fixture(scope="module")
def str_parts(str_model, tmp_path_factory):
    p = tmp_path_factory.mktemp("parts") / "m.recmeta"
    str_model.save(p)
    tensors, meta = rio.read_model_file(p)
    return tensors, {k: v for k, v in meta.items() if k not in ("sha256", "format", "format_version")}


def _load_forged(tmp_path, tensors, meta, limits=None):
    p = tmp_path / "forged.recmeta"
    rio.write_model_file(p, tensors, meta)  # the digest recomputed, as a forger would
    return rm.load(p, limits=limits)


def _u8(b: bytes) -> torch.Tensor:
    return torch.tensor(list(b), dtype=torch.uint8)


def test_unchanged_forgery_loads(str_parts, str_model, tmp_path):
    tensors, meta = str_parts
    _same_model(str_model, _load_forged(tmp_path, tensors, meta), str_model.user_ids[:2].tolist())


@pytest.mark.parametrize("case", [
    "offsets not from 0", "offsets decreasing", "offsets past the bytes", "offsets short of the bytes",
    "offsets wrapping int64", "offsets negative", "offsets empty", "offsets int32", "offsets 2-D",
    "bytes float", "bytes not UTF-8", "surrogate bytes", "char split", "duplicate", "too long",
    "too many", "missing offsets", "missing bytes", "int tensor beside strings", "kind int", "kind mixed",
    "kind missing", "values in the metadata"])
def test_forged_item_id_lists_are_refused(case, str_parts, tmp_path):
    tensors, meta = str_parts
    t, m, limits = dict(tensors), json.loads(json.dumps(meta)), None
    off, buf = tensors["lists.item_ids.offsets"].clone(), tensors["lists.item_ids.utf8"].clone()
    n = len(off) - 1
    names = rio.list_from_tensors(tensors, "item_ids", "str", "p", n)
    assert sorted(names) == sorted(ITEM_NAMES)
    match = "lists.item_ids"
    if case == "offsets not from 0":
        off[0] = 1
    elif case == "offsets decreasing":
        off[2], off[3] = off[3].item(), off[2].item()
        assert off[2] > off[3]
    elif case == "offsets past the bytes":
        off[-1] += 1
    elif case == "offsets short of the bytes":
        off[-1] -= 1
    elif case == "offsets wrapping int64":  # (2**63 - 1) -> -2**63 + 5 wraps to a positive difference
        off = torch.cat([off[:1], torch.tensor([2**63 - 1, -(2**63) + 5]), off[1:]])
    elif case == "offsets negative":
        off[1] = -1
    elif case == "offsets empty":
        off = torch.zeros(0, dtype=torch.int64)
    elif case == "offsets int32":
        off = off.to(torch.int32)
    elif case == "offsets 2-D":
        off = off.reshape(1, -1)
    elif case == "bytes float":
        buf = buf.to(torch.float32)
    elif case == "bytes not UTF-8":
        buf[int(off[-2])] = 0xFF
        match = r"lists.item_ids.utf8 is not valid UTF-8"
    elif case == "surrogate bytes":  # a UTF-16 surrogate encoded as UTF-8: not valid UTF-8
        j = names.index("plain")
        buf = torch.cat([buf[:int(off[j])], _u8(b"\xed\xa0\x80"), buf[int(off[j]) + 3:]])
        match = "not valid UTF-8"
    elif case == "char split":  # "é" is two bytes: a boundary inside it
        j = names.index("é")
        assert off[j + 1] - off[j] == 2
        off[j + 1] -= 1
        match = "splits a UTF-8 character"
    elif case == "duplicate":
        j = names.index("plain")  # renamed to an existing id
        new = [s.encode() for s in names]
        new[j] = "ß".encode()
        buf = _u8(b"".join(new))
        off = torch.tensor(np.concatenate([[0], np.cumsum([len(x) for x in new])]), dtype=torch.int64)
        match = "duplicate ids"
    elif case == "too long":
        limits = LoadLimits(max_id_chars=5)
        match = "max_id_chars=5"
    elif case == "too many":
        limits = LoadLimits(max_items=n - 1)
        match = f"holds {n} strings \\(limit {n - 1}\\)"
    elif case == "missing offsets":
        del t["lists.item_ids.offsets"]
        match = "lists.item_ids.offsets is missing"
    elif case == "missing bytes":
        del t["lists.item_ids.utf8"]
        match = "lists.item_ids.utf8 is missing"
    elif case == "int tensor beside strings":
        t["lists.item_ids.int"] = torch.arange(n)
        match = r"\['lists.item_ids.int'\] do not belong to a list of kind 'str'"
    elif case == "kind int":
        m["item_ids"] = {"kind": "int"}
        match = r"tensors \['lists.item_ids.utf8', 'lists.item_ids.offsets'\] do not belong to a list of kind 'int'"
    elif case == "kind mixed":
        m["item_ids"] = {"kind": "mixed"}
        match = "item_ids"
    elif case == "kind missing":
        m["item_ids"] = {}
        match = "malformed id map item_ids"
    elif case == "values in the metadata":
        m["item_ids"] = {"kind": "str", "values": ITEM_NAMES}
        match = "malformed id map item_ids"
    if "lists.item_ids.offsets" in t:
        t["lists.item_ids.offsets"] = off
    if "lists.item_ids.utf8" in t:
        t["lists.item_ids.utf8"] = buf
    with pytest.raises(ModelFileError, match=match):
        _load_forged(tmp_path, t, m, limits)


def test_forged_int_and_mixed_lists_are_refused(int_model, tmp_path):
    model = _copy(int_model)
    model.feedback([(model.user_ids[0].item(), model.item_ids[1].item(), 1.0, 0.5, 1.0, 0),
                    ("nouveau", model.item_ids[2].item(), 1.0, 0.5, 2.0, 0)])
    p = tmp_path / "m.recmeta"
    model.save(p)
    tensors, meta = rio.read_model_file(p)
    meta = {k: v for k, v in meta.items() if k not in ("sha256", "format", "format_version")}
    ids = tensors["lists.user_ids.int"]
    cases = [
        ({"lists.user_ids.int": torch.cat([ids[:-1], ids[:1]])}, None, "lists.user_ids.int has duplicate ids"),
        ({"lists.user_ids.int": ids.to(torch.float64)}, None, "lists.user_ids.int has shape .* expected 1-D"),
        ({"lists.user_ids.int": ids[:-1].clone()}, None, "hist_offsets"),  # one user short of the histories
        ({"lists.user_ids.int": ids.clone()}, LoadLimits(max_users=len(ids) - 1), f"limit {len(ids) - 1}"),
        ({"lists.feedback_users.is_str": torch.tensor([True, True])}, None, "lists.feedback_users.is_str"),
        ({"lists.feedback_users.is_str": torch.tensor([False, True, False])}, None, "lists.feedback_users.is_str"),
        ({"lists.feedback_users.int": tensors["lists.feedback_users.int"].clone(),
          "lists.feedback_users.is_str": tensors["lists.feedback_users.is_str"].to(torch.uint8)}, None,
         "lists.feedback_users.is_str has shape"),
        ({"lists.item_ids.int": tensors["lists.item_ids.int"].clone(), "lists.stray.int": torch.arange(3)}, None,
         r"unexpected tensors \['lists.stray.int'\]"),
        ({"lists.item_ids.junk": torch.arange(3)}, None, r"unexpected tensors \['lists.item_ids.junk'\]"),
    ]
    for change, limits, match in cases:
        with pytest.raises(ModelFileError, match=match):
            _load_forged(tmp_path, dict(tensors, **change), meta, limits)
    for fu in ([model.user_ids[0].item(), "nouveau"], {"kind": "str"}, {"kind": "mixed", "values": []}):
        with pytest.raises(ModelFileError, match="feedback"):
            _load_forged(tmp_path, tensors, dict(meta, feedback=dict(meta["feedback"], users=fu)))
    # a format-3 file with format 2's feature names or JSON schema values
    with pytest.raises(ModelFileError, match="feature_names in a file of format 3"):
        _load_forged(tmp_path, tensors, dict(meta, feature_names=["tags=α", "tags=β", "tags=γ"]))
    schema = [dict(meta["item_schema"][0], values=["α", "β", "γ"])] + meta["item_schema"][1:]
    with pytest.raises(ModelFileError, match=r"item_schema\[0\].values must be"):
        _load_forged(tmp_path, tensors, dict(meta, item_schema=schema))
    # a format-2 file carrying format-3 list tensors
    p.write_bytes(legacy_blob(tensors, dict(to_legacy(tensors, meta)[1]), version=2))
    with pytest.raises(ModelFileError, match="unexpected tensors"):
        rm.load(p)


def test_list_to_tensors_refuses_what_it_cannot_store():
    with pytest.raises(TypeError, match="True"):
        rio.list_to_tensors("x", [1, True])
    with pytest.raises(TypeError, match="1.5"):
        rio.list_to_tensors("x", ["a", 1.5])
    with pytest.raises(ValueError, match=str(2**63)):
        rio.list_to_tensors("x", [2**63])
    with pytest.raises(ValueError, match="does not fit an int64"):
        rio.list_to_tensors("x", np.array([2**64 - 1], np.uint64))
    with pytest.raises(ValueError, match="UTF-8"):
        rio.list_to_tensors("x", ["ok", "\ud800"])
    with pytest.raises(TypeError, match="holds strings"):
        rio.list_to_tensors("x", [1, "a"], kind="int")
    kind, t = rio.list_to_tensors("x", [3, "é", -(2**63), ""])
    assert kind == "mixed"
    assert rio.list_from_tensors(t, "x", "mixed", "p", 4) == [3, "é", -(2**63), ""]
    with pytest.raises(ModelFileError, match=r"limit 3"):
        rio.list_from_tensors(t, "x", "mixed", "p", 3)
    assert rio.list_to_tensors("x", np.zeros(0, np.int64))[0] == "int"
    assert rio.list_to_tensors("x", [])[0] == "str"


@pytest.mark.parametrize("nul", [False, True])
def test_string_lists_round_trip(nul):
    """Random strings (1-4 byte UTF-8 characters, empty ones; with NULs the string-by-string
    path) round-trip through list_to_tensors / list_from_tensors, bytes and offsets as UTF-8."""
    rng = np.random.default_rng(20261207 + nul)
    alphabet = ["a", "Z", "0", " ", "|", "é", "ß", "Ω", "电", "影", "🎬", "\u0301", "\x7f"] + (["\0"] if nul else [])
    strs = sorted({"".join(rng.choice(alphabet, size=int(rng.integers(0, 9)))) for _ in range(3000)})
    strs = [strs[j] for j in rng.permutation(len(strs))]
    kind, t = rio.list_to_tensors("s", strs)
    assert kind == "str"
    off = t["lists.s.offsets"].numpy()
    assert bytes(t["lists.s.utf8"].numpy()) == "".join(strs).encode()
    np.testing.assert_array_equal(np.diff(off), [len(s.encode()) for s in strs])
    assert rio.list_from_tensors(t, "s", "str", "p", len(strs)) == strs
    mixed = [x for pair in zip(strs[:500], range(500)) for x in pair]
    kind, t = rio.list_to_tensors("m", mixed)
    assert kind == "mixed" and rio.list_from_tensors(t, "m", "mixed", "p", len(mixed)) == mixed
    # a split character is named as such on both paths
    j = next(i for i, s in enumerate(strs[:-1]) if s.encode() != s.encode("ascii", "ignore"))
    kind, t = rio.list_to_tensors("s", strs)
    o = t["lists.s.offsets"].clone()
    b = "".join(strs).encode()
    first_multi = next(k for k in range(int(o[j]), int(o[j + 1])) if b[k] >= 0xC0)
    o[j + 1] = first_multi + 1  # string j ends inside that character
    with pytest.raises(ModelFileError, match="splits a UTF-8 character"):
        rio.list_from_tensors(dict(t, **{"lists.s.offsets": o}), "s", "str", "p", len(strs))
