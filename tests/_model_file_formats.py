"""Test helpers: files of the older model-file formats (1 and 2), written by the logic the
writer of recmeta <= 0.2 used, from the parts of a current (format 3) file.

Format 1 and 2 keep the id maps, the categorical schemas' values, the feature names and the
feedback log's user ids as JSON lists in the metadata; format 3 keeps them in ``lists.*``
tensors (see :mod:`recmeta_sdk.model.io`)."""
from __future__ import annotations

import json

import numpy as np
from safetensors.torch import save

from recmeta_sdk.model import io as rio
from recmeta_sdk.training.loop import schema_names

_ST = {"torch.float32": "F32", "torch.float64": "F64", "torch.int64": "I64", "torch.int32": "I32",
       "torch.bool": "BOOL", "torch.uint8": "U8"}


def _list(tensors: dict, name: str, kind: str, distinct: bool = True) -> list:
    v = rio.list_from_tensors(tensors, name, kind, "test", 2**62, distinct=distinct)
    return v.tolist() if isinstance(v, np.ndarray) else list(v)


def _schema(schema: list, tensors: dict, what: str) -> list:
    out = []
    for j, f in enumerate(schema or []):
        if f.get("kind") in ("multi", "cat"):
            f = dict(f, values=_list(tensors, f"{what}.{j}.values", "str", distinct=False))
        out.append(f)
    return out


def to_legacy(tensors: dict, meta: dict):
    """(tensors, metadata) of a format-3 file -> the same model in the format-2 layout (the
    metadata without ``sha256``, ``format``, ``format_version``, as :func:`legacy_blob` takes it)."""
    assert meta.get("format_version", 3) == 3
    m = {k: v for k, v in meta.items() if k not in ("sha256", "format", "format_version")}
    for which in ("item_ids", "user_ids"):
        kind = meta[which]["kind"]
        m[which] = {"kind": kind, "values": _list(tensors, which, kind)}
    m["item_schema"] = _schema(meta["item_schema"], tensors, "item_schema")
    m["user_schema"] = _schema(meta["user_schema"], tensors, "user_schema")
    m["feature_names"] = schema_names(m["item_schema"])
    if "feedback" in meta:
        m["feedback"] = dict(meta["feedback"], users=_list(tensors, "feedback_users", meta["feedback"]["users"]["kind"]))
    return {k: v for k, v in tensors.items() if not k.startswith("lists.")}, m


def legacy_blob(tensors: dict, meta: dict, version: int = 2, ensure_ascii: bool = False) -> bytes:
    """The bytes the writer of format ``version`` (1 or 2) wrote for these parts: safetensors with
    the metadata JSON (sorted keys) and its SHA-256 over the metadata and the tensors."""
    clean, arrays = {}, {}
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        clean[name] = t
        arrays[name] = (_ST[str(t.dtype)], tuple(t.shape), memoryview(t.numpy().tobytes()))
    meta = dict(meta, format=rio.FORMAT, format_version=version)
    meta["sha256"] = rio._digest(meta, arrays)
    return save(clean, metadata={"recmeta": json.dumps(meta, sort_keys=True, ensure_ascii=ensure_ascii)})
