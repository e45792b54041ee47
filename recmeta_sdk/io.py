"""Model files: safetensors tensors + JSON metadata, SHA-256, atomic writes, no pickle.

File layout (a standard safetensors file, readable by any safetensors reader)::

    8 bytes   little-endian u64: header length H
    H bytes   JSON header: {tensor name: {"dtype", "shape", "data_offsets"}, ...,
              "__metadata__": {"recmeta": <JSON string of the model metadata>}}
    rest      the tensor bytes

The model metadata holds ``format`` (``"recmeta-model"``), ``format_version``, the
config, the external id maps (items and users, with their kind ``int`` or ``str``), the
feature schemas, optionally (version 2) the online ``feedback`` log's metadata (its
tensors are ``feedback.*``; see :func:`recmeta_sdk.online.log_to_file`) and ``sha256``: the SHA-256 of the canonical metadata JSON (without
``sha256``) followed by, for every tensor in name order, its name, dtype, shape and raw
bytes.

Loading reads and validates the header (size bounds, JSON, known dtypes, shapes and
offsets that tile the data area exactly, the format version) *before* any tensor is
allocated, then checks the SHA-256, then the consistency of tensors, ids and config.
Any failure raises :class:`ModelFileError` (a ``ValueError``), the one documented
exception for a tampered, truncated or inconsistent file. Nothing is ever unpickled.

Saving writes to a temporary file in the destination directory, flushes and fsyncs it,
renames it over the destination with :func:`os.replace` and fsyncs the directory, so a
crash leaves either the old file or the new one, never a torn one.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from pathlib import Path
from typing import Dict, Tuple

import numpy as np
import torch

__all__ = ["ModelFileError", "FORMAT", "FORMAT_VERSION", "READABLE_VERSIONS", "write_model_file",
           "read_model_file"]

FORMAT = "recmeta-model"
#: the version written. 2 adds the optional feedback log (``feedback.*`` tensors and the
#: ``feedback`` metadata entry, see :func:`recmeta_sdk.online.log_to_file`); a version-1
#: file is a version-2 file without a log, so both are read.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
MAX_HEADER = 256 * 1024 * 1024

_DTYPES = {"F32": (np.float32, torch.float32), "I64": (np.int64, torch.int64),
           "F64": (np.float64, torch.float64), "I32": (np.int32, torch.int32),
           "BOOL": (np.bool_, torch.bool)}
_TORCH_TO_ST = {v[1]: k for k, v in _DTYPES.items()}


class ModelFileError(ValueError):
    """A model file is unreadable: truncated, tampered with, inconsistent or of an unknown format."""


def _digest(meta: dict, arrays: Dict[str, Tuple[str, tuple, memoryview]]) -> str:
    h = hashlib.sha256()
    body = {k: v for k, v in meta.items() if k != "sha256"}
    h.update(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())
    for name in sorted(arrays):
        dt, shape, buf = arrays[name]
        h.update(json.dumps([name, dt, list(shape)]).encode())
        h.update(buf)
    return h.hexdigest()


def write_model_file(path, tensors: Dict[str, torch.Tensor], meta: dict) -> None:
    """Write tensors + metadata atomically (see the module docstring)."""
    from safetensors.torch import save

    path = Path(path)
    clean = {}
    arrays = {}
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        if t.dtype not in _TORCH_TO_ST:
            raise TypeError(f"tensor {name!r}: unsupported dtype {t.dtype}")
        clean[name] = t
        arrays[name] = (_TORCH_TO_ST[t.dtype], tuple(t.shape), memoryview(t.numpy().tobytes()))
    meta = dict(meta, format=FORMAT, format_version=FORMAT_VERSION)
    meta["sha256"] = _digest(meta, arrays)
    blob = save(clean, metadata={"recmeta": json.dumps(meta, sort_keys=True)})
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise ValueError(f"cannot save to {str(path)!r}: directory {str(directory)!r} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:  # pragma: no cover - platforms without directory fsync
        pass


def read_model_file(path) -> Tuple[Dict[str, torch.Tensor], dict]:
    """Read and verify a model file; returns (tensors, metadata). Raises ModelFileError."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no model file at {str(path)!r}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ModelFileError(f"{path}: truncated ({size} bytes, no header)")
        (hlen,) = struct.unpack("<Q", head)
        if hlen > MAX_HEADER or 8 + hlen > size:
            raise ModelFileError(f"{path}: header length {hlen} does not fit the file ({size} bytes): truncated or corrupt")
        raw = f.read(hlen)
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ModelFileError(f"{path}: header is not valid JSON ({e})") from None
        if not isinstance(header, dict):
            raise ModelFileError(f"{path}: header is not a JSON object")
        md = header.pop("__metadata__", None)
        if not isinstance(md, dict) or not isinstance(md.get("recmeta"), str):
            raise ModelFileError(f"{path}: not a recmeta model file (no recmeta metadata)")
        try:
            meta = json.loads(md["recmeta"])
        except json.JSONDecodeError as e:
            raise ModelFileError(f"{path}: metadata is not valid JSON ({e})") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise ModelFileError(f"{path}: not a recmeta model file (format {meta.get('format') if isinstance(meta, dict) else None!r})")
        fv = meta.get("format_version")
        if isinstance(fv, bool) or fv not in READABLE_VERSIONS:
            raise ModelFileError(f"{path}: unsupported format_version {fv!r} "
                                 f"(this version reads {', '.join(map(str, READABLE_VERSIONS))})")
        data_len = size - 8 - hlen
        spans = []
        for name, info in header.items():
            if not isinstance(info, dict) or info.get("dtype") not in _DTYPES:
                raise ModelFileError(f"{path}: tensor {name!r} has an unknown dtype")
            shape, offs = info.get("shape"), info.get("data_offsets")
            if (not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape)
                    or not isinstance(offs, list) or len(offs) != 2
                    or not all(isinstance(o, int) for o in offs)):
                raise ModelFileError(f"{path}: tensor {name!r} has a malformed shape or offsets")
            nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(_DTYPES[info["dtype"]][0]).itemsize
            if offs[0] < 0 or offs[1] - offs[0] != nbytes or offs[1] > data_len:
                raise ModelFileError(f"{path}: tensor {name!r} does not fit the data area (truncated or inconsistent)")
            spans.append((offs[0], offs[1]))
        spans.sort()
        pos = 0
        for a, b in spans:
            if a != pos:
                raise ModelFileError(f"{path}: tensor data areas overlap or leave gaps")
            pos = b
        if pos != data_len:
            raise ModelFileError(f"{path}: {data_len - pos} unexpected bytes after the tensors")
        data = f.read(data_len)
    if len(data) != data_len:
        raise ModelFileError(f"{path}: truncated while reading")
    view = memoryview(data)
    arrays = {name: (info["dtype"], tuple(info["shape"]), view[info["data_offsets"][0]:info["data_offsets"][1]])
              for name, info in header.items()}
    if _digest(meta, arrays) != meta.get("sha256"):
        raise ModelFileError(f"{path}: SHA-256 mismatch: the file was modified or corrupted")
    tensors = {}
    for name, (dt, shape, buf) in arrays.items():
        arr = np.frombuffer(buf, dtype=_DTYPES[dt][0]).reshape(shape).copy()
        tensors[name] = torch.from_numpy(arr)
    return tensors, meta
