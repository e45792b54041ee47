"""Model files: safetensors tensors + JSON metadata, SHA-256, atomic writes, no pickle.

File layout (a standard safetensors file, readable by any safetensors reader)::

    8 bytes   little-endian u64: header length H
    H bytes   JSON header: {tensor name: {"dtype", "shape", "data_offsets"}, ...,
              "__metadata__": {"recmeta": <JSON string of the model metadata>}}
    rest      the tensor bytes

The metadata JSON is written as UTF-8 (``ensure_ascii=False``). The model metadata holds
``format`` (``"recmeta-model"``), ``format_version``, the config, the kinds of the external
id maps (items and users: ``{"kind": "int" | "str"}``), the feature schemas, optionally
(version 2 and later) the online ``feedback`` log's metadata (its tensors are
``feedback.*``; see :func:`recmeta_sdk.online.log_to_file`), the versions of the library and
of torch that wrote the file (``library_version``, ``torch_version``; informative, absent
from older files) and ``sha256``: the SHA-256 of the canonical metadata JSON (without
``sha256``) followed by, for every tensor in name order, its name, dtype, shape and raw bytes.

Version 3 keeps every list that grows with the users, items or feature values in tensors,
not in the JSON (:func:`list_to_tensors`): the id maps (``lists.item_ids.*``,
``lists.user_ids.*``), the values of each categorical feature of the schemas
(``lists.item_schema.<j>.values.*``, the schema entry's ``values`` is ``{"kind": "str"}``)
and the feedback log's user ids (``lists.feedback_users.*``, ints and strings mixed); ints
are an int64 tensor, strings their UTF-8 bytes (uint8) and int64 offsets. So the header of a
valid file is small (a few KiB) and its length is capped at 1 MiB by default
(:attr:`LoadLimits.max_header_bytes`), checked from the 8-byte prefix before the header is
read: a file with a larger header is refused in O(1). Versions 1 and 2 (recmeta <= 0.2) keep
these lists as JSON in the metadata (and the item feature names, which version 3 derives from
the schema); they are still read, with the same checks, and a file of theirs whose header
exceeds the cap loads with ``LoadLimits(max_header_bytes=LEGACY_MAX_HEADER)``; saving it
again writes version 3.

Loading reads and validates the header *before* any tensor is allocated: the file and
header sizes, the JSON's nesting depth, number of values, backslash escapes and literal
lengths (checked on the raw bytes before it is parsed, so that parsing costs a few
nanoseconds per byte), the dtypes, shapes and offsets (which must tile the data
area exactly), the format version; then it checks the SHA-256. Every size is bounded by a
:class:`LoadLimits` (overridable by the caller). The SHA-256 is an integrity check, not
authentication: whoever edits a file can recompute it, so :func:`recmeta_sdk.api.load`
then checks every count and config value against the limits, every list's tensors
(:func:`list_from_tensors`: offsets, UTF-8, lengths, counts, duplicates) and the consistency
of tensors, ids and config before it builds the model. Any failure raises
:class:`ModelFileError` (a ``ValueError``), the one documented exception for a tampered,
truncated, inconsistent or oversized file. Nothing is ever unpickled.

Saving writes to a temporary file ``.<name>.<pid>-<random>.tmp`` in the destination
directory, flushes and fsyncs it, renames it over the destination with :func:`os.replace`
and fsyncs the directory, so a crash leaves either the old file or the new one, never a
torn one. The temporary files that a killed writer left behind are removed by the next
save or load of the same path (:func:`remove_stale_temp_files`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import stat
import struct
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Dict, Optional, Tuple

import numpy as np

if TYPE_CHECKING:  # the reader is torch-free (read_model_arrays); torch loads where tensors are made
    import torch

__all__ = ["ModelFileError", "LoadLimits", "FORMAT", "FORMAT_VERSION", "READABLE_VERSIONS", "MAX_HEADER",
           "LEGACY_MAX_HEADER", "write_model_file", "read_model_file", "read_model_arrays", "remove_stale_temp_files",
           "list_to_tensors", "list_from_tensors", "list_tensor_names"]

FORMAT = "recmeta-model"
#: the version written. 2 adds the optional feedback log (``feedback.*`` tensors and the
#: ``feedback`` metadata entry, see :func:`recmeta_sdk.online.log_to_file`); a version-1
#: file is a version-2 file without a log, so both are read. 3 moves every list that grows
#: with the users, items or feature values (the id maps, the feedback log's user ids, the
#: categorical schemas' values) out of the JSON into ``lists.*`` tensors
#: (:func:`list_to_tensors`), so that the header of a valid file stays small and its length
#: can be capped (:attr:`LoadLimits.max_header_bytes`) before it is read.
FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
#: the default bound of the header length: a version-3 header holds the config, the schemas
#: and one short entry per tensor (a few KiB for the models ``train`` builds)
MAX_HEADER = 2**20
#: the bound safetensors itself applies: what a version-1 or 2 file with large id maps in its
#: header may need (``LoadLimits(max_header_bytes=LEGACY_MAX_HEADER)``; re-saving converts it)
LEGACY_MAX_HEADER = 100_000_000

#: the safetensors dtypes a model file may hold, as numpy dtypes
_DTYPES = {"F32": np.float32, "I64": np.int64, "F64": np.float64, "I32": np.int32, "BOOL": np.bool_,
           "U8": np.uint8}
_NP_TO_ST = {np.dtype(v): k for k, v in _DTYPES.items()}
logger = logging.getLogger("recmeta")


class ModelFileError(ValueError):
    """A model file is unreadable: truncated, tampered with, inconsistent, oversized or of an unknown format."""


@dataclasses.dataclass(frozen=True)
class LoadLimits:
    """Bounds on everything a model file declares, checked before anything is allocated.

    Pass one to :func:`recmeta_sdk.load` (``limits=``) to load a file beyond a default,
    e.g. ``rm.load(p, limits=rm.LoadLimits(max_file_bytes=2**40))``; every bound is
    inclusive and each violation raises :class:`ModelFileError` naming the value and the
    limit. The defaults admit any model :func:`recmeta_sdk.train` builds with sane settings.

    Attributes
    ----------
    max_file_bytes : int
        Size of the file (its tensors are read into memory, then copied once).
    max_header_bytes : int
        Length of the JSON header, checked before a byte of it is read (default 1 MiB:
        :data:`MAX_HEADER`). A version-3 file keeps its id maps and other long lists in
        tensors, so its header is small; a file of format 1 or 2 (recmeta <= 0.2) holds its id
        maps in the header and may need up to :data:`LEGACY_MAX_HEADER` (re-saving it writes
        version 3).
    max_json_depth : int
        Nesting depth of ``[`` / ``{`` in the header and in the metadata JSON, checked on the
        raw bytes before parsing (the files written have depth 5 or less).
    max_json_values : int
        Number of JSON values (counted as commas) in the header beyond one per 16 bytes of
        tensor data: every id, name or number of the metadata describes tensor rows, so a
        header cannot list much more than its tensors hold. Bounds the parse time.
    max_json_escapes : int
        Backslash escapes in the header beyond four per JSON value and one per 16 bytes of
        tensor data (the metadata JSON is a string in the header, so each of its quotes is
        written ``\\"``: an id costs two). Bounds the parse time (an escape costs a JSON
        parser about ten times a plain byte). Non-ASCII ids are written as UTF-8, without
        escapes; a file of recmeta <= 0.1 wrote each of their characters as ``\\uXXXX``
        (two backslashes), which may need a higher bound.
    max_int_digits : int
        Digits of an integer literal (int64 and uint64 need 20 at most).
    max_float_chars : int
        Characters of a floating-point literal.
    max_tensors : int
        Number of tensors.
    max_rank : int
        Dimensions of a tensor.
    max_items, max_users : int
        Entries of the item and user id maps (each also bounded by the tensor shapes); also
        the bounds of the values of a categorical item / user feature and (``max_users``) of
        the feedback log's distinct users.
    max_id_chars : int
        Length of a string id, feature column or value.
    max_dim, max_hidden, max_layers, max_heads, max_seq_len : int
        Bounds of ``config.dim``, ``hidden``, ``layers``, ``heads``, ``seq_len`` (the
        network's shapes must also match the tensors in the file).
    max_inner_steps : int
        Bound of ``config.inner_steps``: the adaptation steps every ``recommend`` of a known
        user and every ``adapt`` runs by default.
    max_config_int : int
        Bound of the absolute value of the other integer config values (``epochs``,
        ``batch_size``, ``wide_max_items``, ``feedback_window``, ...); ``seed`` must be a
        valid torch seed.
    max_config_float : float
        Bound of the absolute value of the floating-point config values, which must be finite.
    max_abs_weight : float
        Bound of the absolute value of every floating-point tensor entry (weights, biases,
        dense features, rewards), which must be finite (NaN marks a missing propensity or
        timestamp in the feedback log, the only place it is allowed).
    max_log_step : float
        Bound of the absolute value of the logarithms of the adaptation step sizes (the
        tensor ``log_lr``, and ``config.inner_lr``) and of the wide part's multiplier.
    min_temperature : float
        Lower bound of ``config.temperature`` (the scores are divided by it).
    max_feedback_events : int
        Events of the saved online feedback log.
    """

    max_file_bytes: int = 16 * 2**30
    max_header_bytes: int = MAX_HEADER
    max_json_depth: int = 32
    max_json_values: int = 65536
    max_json_escapes: int = 65536
    max_int_digits: int = 20
    max_float_chars: int = 64
    max_tensors: int = 4096
    max_rank: int = 4
    max_items: int = 50_000_000
    max_users: int = 500_000_000
    max_id_chars: int = 4096
    max_dim: int = 8192
    max_hidden: int = 65536
    max_layers: int = 64
    max_heads: int = 256
    max_seq_len: int = 8192
    max_inner_steps: int = 100
    max_config_int: int = 2**31 - 1
    max_config_float: float = 1e12
    max_abs_weight: float = 1e6
    max_log_step: float = 10.0
    min_temperature: float = 1e-3
    max_feedback_events: int = 100_000_000

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            ok = (isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0
                  and (not isinstance(v, float) or math.isfinite(v)))
            if not ok:
                raise ValueError(f"LoadLimits.{f.name} must be a finite number >= 0, got {v!r}")


DEFAULT_LIMITS = LoadLimits()


# ---------------------------------------------------------------------------- digest, writer

def _digest(meta: dict, arrays: Dict[str, Tuple[str, tuple, memoryview]]) -> str:
    h = hashlib.sha256()
    body = {k: v for k, v in meta.items() if k != "sha256"}
    h.update(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())
    for name in sorted(arrays):
        dt, shape, buf = arrays[name]
        h.update(json.dumps([name, dt, list(shape)]).encode())
        h.update(buf)
    return h.hexdigest()


# temp files this process is writing now (never removed by its own clean-ups)
_IN_FLIGHT: set = set()
_IN_FLIGHT_LOCK = threading.Lock()
#: a temp file named without a writer pid (written by recmeta 0.1.0) is removed once it is
#: this many seconds old: its writer cannot be asked whether it still runs
LEGACY_TEMP_AGE_S = 60.0


def _temp_patterns(name: str):
    esc = re.escape(f".{name}.")
    return re.compile(esc + r"(\d{1,10})-[a-z0-9_]{8}\.tmp"), re.compile(esc + r"[a-z0-9_]{8}\.tmp")


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return True  # not a pid we wrote: keep the file
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True
    return True


def remove_stale_temp_files(path) -> list:
    """Remove the temporary files that interrupted saves of ``path`` left behind.

    Only regular files in ``path``'s directory named as this module's atomic writer names
    its temp files for ``path`` are candidates: ``.<name>.<pid>-<8 chars>.tmp``, removed
    when the process ``pid`` no longer exists (or is this process and is not writing it now),
    and ``.<name>.<8 chars>.tmp`` (the name used by recmeta 0.1.0, without a pid), removed
    once older than :data:`LEGACY_TEMP_AGE_S`. Other files are never touched; errors
    (a read-only directory, a race with another clean-up) are ignored.

    Returns
    -------
    list of str
        The names removed.
    """
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    with_pid, legacy = _temp_patterns(path.name)
    removed = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    me = os.getpid()
    now = time.time()
    for e in entries:
        m = with_pid.fullmatch(e.name)
        old = m is None and legacy.fullmatch(e.name) is not None
        if m is None and not old:
            continue
        try:
            st = e.stat(follow_symlinks=False)
        except OSError:
            continue
        if not stat.S_ISREG(st.st_mode):
            continue
        full = os.path.join(directory, e.name)
        with _IN_FLIGHT_LOCK:
            if old:
                stale = now - st.st_mtime > LEGACY_TEMP_AGE_S
            else:
                pid = int(m.group(1))
                stale = (full not in _IN_FLIGHT) if pid == me else not _pid_alive(pid)
            if not stale:
                continue
            try:
                os.unlink(full)
            except OSError:
                continue
        removed.append(e.name)
    return removed


def _versions() -> dict:
    import sys

    from .. import __version__

    torch = sys.modules.get("torch")  # the writer of a model always has it; a torch-free writer says so
    return {"library_version": str(__version__), "torch_version": str(torch.__version__) if torch else "none"}


def _as_array(name: str, t) -> np.ndarray:
    """A tensor (torch or numpy) as a C-contiguous numpy array of a model-file dtype."""
    if not isinstance(t, np.ndarray):
        if not hasattr(t, "detach"):
            raise TypeError(f"tensor {name!r}: expected a torch tensor or a numpy array, got {type(t).__name__}")
        if str(t.dtype) not in ("torch.float32", "torch.int64", "torch.float64", "torch.int32", "torch.bool",
                                "torch.uint8"):
            raise TypeError(f"tensor {name!r}: unsupported dtype {t.dtype}")
        t = t.detach().cpu().contiguous().numpy()
    if t.dtype not in _NP_TO_ST:
        raise TypeError(f"tensor {name!r}: unsupported dtype {t.dtype}")
    return np.ascontiguousarray(t)


def write_model_file(path, tensors: Dict[str, "torch.Tensor | np.ndarray"], meta: dict) -> None:
    """Write tensors (torch tensors or numpy arrays) + metadata atomically (see the module
    docstring).

    ``meta`` gets ``format``, ``format_version``, ``library_version``, ``torch_version`` and
    ``sha256``. The temp files of earlier interrupted saves of ``path`` are removed first.
    """
    from safetensors.numpy import save

    path = Path(path)
    clean = {}
    arrays = {}
    for name, t in tensors.items():
        a = _as_array(name, t)
        clean[name] = a
        arrays[name] = (_NP_TO_ST[a.dtype], tuple(a.shape), memoryview(a.tobytes()))
    meta = dict(meta, format=FORMAT, format_version=FORMAT_VERSION, **_versions())
    meta["sha256"] = _digest(meta, arrays)
    # ensure_ascii=False: non-ASCII ids are stored as UTF-8, not as \uXXXX escapes that the
    # loader's escape bound counts (the digest hashes its own canonical form, unchanged)
    blob = save(clean, metadata={"recmeta": json.dumps(meta, sort_keys=True, ensure_ascii=False)})
    (hlen,) = struct.unpack("<Q", blob[:8])
    if hlen > MAX_HEADER:
        logger.warning("%s: the file's header has %d bytes, more than the default max_header_bytes=%d: loading it "
                       "needs rm.load(path, limits=rm.LoadLimits(max_header_bytes=...))", path, hlen, MAX_HEADER)
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise ValueError(f"cannot save to {str(path)!r}: directory {str(directory)!r} does not exist")
    remove_stale_temp_files(path)
    with _IN_FLIGHT_LOCK:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}-", suffix=".tmp", dir=directory)
        tmp = os.path.join(directory, os.path.basename(tmp))
        _IN_FLIGHT.add(tmp)
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
    finally:
        with _IN_FLIGHT_LOCK:
            _IN_FLIGHT.discard(tmp)
    try:
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:  # pragma: no cover - platforms without directory fsync
        pass


# ---------------------------------------------------------------------------- bounded JSON

# bytes.translate tables: delete every byte but the ones a check counts (one C pass over
# the header, leaving a short string to count in)
_DEL_BUT_COUNTED = bytes(b for b in range(256) if b not in b",[{\\")
_DEL_BUT_STRUCTURE = bytes(b for b in range(256) if b not in b'"[]{}')


def _json_depth(raw: bytes) -> int:
    """The maximal nesting depth of ``[`` / ``{`` outside strings in JSON text ``raw``.
    Escapes are blanked out (in JSON a backslash escapes the next character; left-to-right
    replacement of ``\\\\`` then of ``\\"`` pairs them exactly as a parser does), the
    text is reduced to its quotes and brackets (C passes), then a bracket is inside a
    string when an odd number of quotes precede it (vectorised)."""
    if b"\\" in raw:
        raw = raw.replace(b"\\\\", b"__").replace(b'\\"', b"__")
    a = np.frombuffer(raw.translate(None, _DEL_BUT_STRUCTURE), np.uint8)
    is_quote = a == 0x22
    outside = (np.cumsum(is_quote, dtype=np.int64) - is_quote) % 2 == 0
    br = a[outside & ~is_quote]
    if not len(br):
        return 0
    return int(np.cumsum(np.where((br & 0xDF) == 0x5B, 1, -1), dtype=np.int64).max())


def _bounded_json(raw: bytes, what: str, path, limits: LoadLimits, extra_values: int):
    """``json.loads`` of ``raw`` after checks on the raw bytes that bound its cost: the number
    of values (commas and opening brackets), of backslash escapes, the nesting depth and
    (while parsing) the length of every number literal. The counts are one C pass
    (``bytes.translate``) over the bytes; the depth is computed only when there are more
    opening brackets than ``max_json_depth``."""
    counted = np.frombuffer(raw.translate(None, _DEL_BUT_COUNTED), np.uint8)
    n_commas = int(np.count_nonzero(counted == 0x2C))
    n_escapes = int(np.count_nonzero(counted == 0x5C))
    n_open = len(counted) - n_commas - n_escapes
    n_values = n_commas + n_open
    if n_values > limits.max_json_values + extra_values:
        raise ModelFileError(f"{path}: {what} has {n_values} JSON values, more than its {extra_values * 16} "
                             f"bytes of tensor data can describe (limit max_json_values={limits.max_json_values} "
                             f"plus one per 16 bytes of tensor data)")
    if n_escapes > 4 * n_values + limits.max_json_escapes + extra_values:
        raise ModelFileError(f"{path}: {what} has {n_escapes} backslash escapes for {n_values} JSON values and "
                             f"{extra_values * 16} bytes of tensor data (limit max_json_escapes="
                             f"{limits.max_json_escapes} plus four per value and one per 16 bytes of tensor data)")
    del counted
    if n_open > limits.max_json_depth:
        depth = _json_depth(raw)
        if depth > limits.max_json_depth:
            raise ModelFileError(f"{path}: {what} nests {depth} levels deep (limit max_json_depth="
                                 f"{limits.max_json_depth})")

    def parse_int(s: str) -> int:
        if len(s) > limits.max_int_digits + 1 and len(s.lstrip("-")) > limits.max_int_digits:
            raise ModelFileError(f"{path}: {what} has an integer of {len(s)} digits "
                                 f"(limit max_int_digits={limits.max_int_digits}): {s[:24]}...")
        return int(s)

    def parse_float(s: str) -> float:
        if len(s) > limits.max_float_chars:
            raise ModelFileError(f"{path}: {what} has a number literal of {len(s)} characters "
                                 f"(limit max_float_chars={limits.max_float_chars}): {s[:24]}...")
        return float(s)

    try:
        return json.loads(raw.decode("utf-8"), parse_int=parse_int, parse_float=parse_float)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFileError(f"{path}: {what} is not valid JSON ({e})") from None
    except RecursionError:  # pragma: no cover - the depth check runs first
        raise ModelFileError(f"{path}: {what} nests too deep") from None


def _check_int(v, name: str, path, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ModelFileError(f"{path}: {name} must be an int in [{lo}, {hi}], got {_short(v)}")
    return v


def _short(v) -> str:
    s = repr(v)
    return s if len(s) <= 80 else s[:77] + "..."


# ---------------------------------------------------------------------------- lists as tensors

#: the kinds of a list stored by :func:`list_to_tensors`
LIST_KINDS = ("int", "str", "mixed")


def _list_names(name: str) -> dict:
    p = f"lists.{name}."
    return {"int": p + "int", "utf8": p + "utf8", "offsets": p + "offsets", "is_str": p + "is_str"}


def list_tensor_names(name: str) -> set:
    """The names of the tensors a list ``name`` may have (see :func:`list_to_tensors`)."""
    return set(_list_names(name).values())


def list_to_tensors(name: str, values, kind: Optional[str] = None) -> Tuple[str, Dict[str, "torch.Tensor"]]:
    """A list of ids (ints, strings or both) as tensors, for a model file of format 3.

    Ints are stored as an int64 tensor ``lists.<name>.int``; strings as their UTF-8 bytes
    concatenated, ``lists.<name>.utf8`` (uint8), and the byte offsets of each string,
    ``lists.<name>.offsets`` (int64, ``n + 1`` entries from 0); a list mixing both (the
    feedback log's users) adds ``lists.<name>.is_str`` (bool, one per entry: which of the
    two lists holds the next entry). Read back with :func:`list_from_tensors`.

    Parameters
    ----------
    name : str
        The list's name in the file (tensor names ``lists.<name>.*``).
    values : (n,) array or sequence of int or str
        The ids, in order (numpy integers and strings count as ints and strings).
    kind : {"int", "str", "mixed"}, optional
        The kind to write (default: from the values; an empty list is ``"int"`` when
        ``values`` is an integer array, else ``"str"``).

    Returns
    -------
    (kind, tensors) : (str, dict of str to Tensor)

    Raises
    ------
    TypeError
        if an entry is neither an int nor a string (bools are refused), or does not fit ``kind``.
    ValueError
        if an int is outside int64 or a string cannot be encoded as UTF-8 (a lone surrogate).
    """
    import torch

    names = _list_names(name)
    arr = values if isinstance(values, np.ndarray) else None
    if arr is not None and arr.dtype != object and np.issubdtype(arr.dtype, np.integer):
        if arr.dtype == np.uint64 and len(arr) and int(arr.max()) > 2**63 - 1:
            raise ValueError(f"{name}: id {int(arr.max())} does not fit an int64")
        if kind not in (None, "int", "mixed"):
            raise TypeError(f"{name}: int ids cannot be written as a list of kind {kind!r}")
        ints = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.int64))
        if kind == "mixed":
            return "mixed", {names["int"]: ints, names["utf8"]: torch.zeros(0, dtype=torch.uint8),
                             names["offsets"]: torch.zeros(1, dtype=torch.int64),
                             names["is_str"]: torch.zeros(len(arr), dtype=torch.bool)}
        return "int", {names["int"]: ints}
    vals = list(values)
    try:  # all strings (the common case): a C loop decides
        all_str = bool(vals) and kind in (None, "str") and isinstance("".join(vals), str)
    except TypeError:
        all_str = False
    is_str = np.ones(len(vals), bool) if all_str else np.array([isinstance(v, str) for v in vals], dtype=bool)
    for v in (vals if not is_str.all() else ()):
        if not isinstance(v, str) and (isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer))):
            raise TypeError(f"{name}: id {_short(v)} of type {type(v).__name__} is neither an int nor a string")
    found = ("str" if is_str.all() else "int" if not is_str.any() else "mixed") if vals else None
    if kind is None:
        kind = found or ("int" if arr is not None and np.issubdtype(arr.dtype, np.integer) else "str")
    elif kind not in LIST_KINDS:
        raise ValueError(f"{name}: kind must be one of {LIST_KINDS}, got {kind!r}")
    elif found is not None and kind != "mixed" and found != kind:
        raise TypeError(f"{name}: a list of kind {kind!r} holds {'strings' if kind == 'int' else 'ints'}")
    out = {}
    if kind in ("int", "mixed"):
        ints = [int(v) for v, s in zip(vals, is_str) if not s]
        bad = next((v for v in ints if not -(2**63) <= v <= 2**63 - 1), None)
        if bad is not None:
            raise ValueError(f"{name}: id {bad} does not fit an int64")
        out[names["int"]] = torch.tensor(ints, dtype=torch.int64) if ints else torch.zeros(0, dtype=torch.int64)
    if kind in ("str", "mixed"):
        strs = vals if is_str.all() else [v for v, s in zip(vals, is_str) if s]
        try:
            data, offsets = _encode_strings(strs)
        except UnicodeEncodeError as e:
            raise ValueError(f"{name}: a string id cannot be encoded as UTF-8 ({e})") from None
        out[names["utf8"]] = torch.from_numpy(data)
        out[names["offsets"]] = torch.from_numpy(offsets)
    if kind == "mixed":
        out[names["is_str"]] = torch.from_numpy(is_str.copy())
    return kind, out


def _encode_strings(strs: list) -> Tuple[np.ndarray, np.ndarray]:
    """(UTF-8 bytes (uint8), int64 offsets) of strings. Without NUL characters in them the
    work is done by C loops: the strings joined by NULs, encoded once, the NULs located and
    dropped; else one encode per string."""
    joined = "\0".join(strs)
    if strs and joined.count("\0") == len(strs) - 1:
        b = np.frombuffer(joined.encode("utf-8"), np.uint8)
        nul = np.flatnonzero(b == 0)
        keep = np.ones(len(b), bool)
        keep[nul] = False
        data = b[keep]
        offsets = np.empty(len(strs) + 1, np.int64)
        offsets[0], offsets[-1] = 0, len(data)
        offsets[1:-1] = nul - np.arange(len(nul))
        return data, offsets
    enc = [str(v).encode("utf-8") for v in strs]
    offsets = np.zeros(len(enc) + 1, np.int64)
    np.cumsum(np.array([len(x) for x in enc], dtype=np.int64), out=offsets[1:])
    return np.frombuffer(b"".join(enc), np.uint8).copy(), offsets


def _decode_strings(buf: np.ndarray, off: np.ndarray) -> Optional[list]:
    """The strings of UTF-8 bytes ``buf`` at checked offsets ``off`` by C loops (a NUL inserted
    before each string, one decode, one split), or None when the bytes hold a NUL or the
    decode fails (the caller then decodes string by string, naming the failure)."""
    if len(off) < 2 or (buf == 0).any():
        return None if len(off) >= 2 else []
    try:
        return np.insert(buf, off[1:-1], 0).tobytes().decode("utf-8").split("\0")
    except UnicodeDecodeError:
        return None


def _has_repeats(a: np.ndarray) -> bool:
    """Whether a 1-D int array holds a value twice (a sort: numpy's hash-based ``unique``
    is much slower on large int64 arrays)."""
    s = np.sort(a)
    return bool(len(s) > 1 and (s[1:] == s[:-1]).any())


def _list_tensor(tensors: dict, tname: str, dtype, path) -> np.ndarray:
    t = tensors.get(tname)
    if t is None:
        raise ModelFileError(f"{path}: tensor {tname} is missing")
    a = t if isinstance(t, np.ndarray) else t.numpy()  # a torch tensor (read_model_file) or an array
    if a.ndim != 1 or a.dtype != dtype:
        raise ModelFileError(f"{path}: tensor {tname} has shape {tuple(a.shape)} {a.dtype}, expected 1-D "
                             f"{np.dtype(dtype)}")
    return a


def list_from_tensors(tensors: dict, name: str, kind, path, max_count: int, limits: Optional[LoadLimits] = None,
                      *, distinct: bool = True):
    """The list :func:`list_to_tensors` stored as ``lists.<name>.*``, validated.

    Checks, each failure a :class:`ModelFileError` naming the tensor: the kind; the tensors'
    presence, dtypes and 1-D shapes; the count (at most ``max_count``); the offsets (``n + 1``
    of them, from 0, non-decreasing, ending at the byte count); the bytes (valid UTF-8, every
    string starting at a character boundary, at most ``limits.max_id_chars`` characters);
    a mixed list's mask (as many ints and strings as stored); and, with ``distinct``, that no
    id repeats (an int and a string never equal each other).

    Parameters
    ----------
    tensors : dict of str to Tensor
        The file's tensors.
    name : str
        The list's name.
    kind : {"int", "str", "mixed"}
        The kind recorded in the metadata (any other value is refused).
    path : str or Path
        For the messages.
    max_count : int
        The bound of the number of entries.
    limits : LoadLimits, optional
    distinct : bool
        Refuse repeated ids.

    Returns
    -------
    (n,) int64 ndarray for ``"int"``; a list of ``str`` for ``"str"``; a list of ``int`` and
    ``str`` for ``"mixed"``.
    """
    limits = DEFAULT_LIMITS if limits is None else limits
    names = _list_names(name)
    if not isinstance(kind, str) or kind not in LIST_KINDS:
        raise ModelFileError(f"{path}: the list {name} has an unknown kind {_short(kind)} (one of {LIST_KINDS})")
    want = {"int": ("int",), "str": ("utf8", "offsets"), "mixed": ("int", "utf8", "offsets", "is_str")}[kind]
    extra = [names[k] for k in names if k not in want and names[k] in tensors]
    if extra:
        raise ModelFileError(f"{path}: tensors {extra} do not belong to a list of kind {kind!r}")
    ints = _list_tensor(tensors, names["int"], np.int64, path) if "int" in want else None
    strs = []
    if "utf8" in want:
        buf = _list_tensor(tensors, names["utf8"], np.uint8, path)
        off = _list_tensor(tensors, names["offsets"], np.int64, path)
        if len(off) - 1 > max_count:
            raise ModelFileError(f"{path}: tensor {names['offsets']} holds {len(off) - 1} strings (limit {max_count})")
        if (len(off) == 0 or off[0] != 0 or off[-1] != len(buf) or (off < 0).any() or (off > len(buf)).any()
                or (np.diff(off) < 0).any()):
            raise ModelFileError(f"{path}: tensor {names['offsets']} is not a non-decreasing 0..{len(buf)} sequence "
                                 f"(the byte offsets of the strings in {names['utf8']})")
        if len(off) > 1 and int(np.diff(off).max()) > 4 * limits.max_id_chars:
            raise ModelFileError(f"{path}: tensor {names['utf8']} holds a string of {int(np.diff(off).max())} bytes "
                                 f"(limit max_id_chars={limits.max_id_chars} characters)")
        strs = _decode_strings(buf, off)
        raw = buf.tobytes()
        try:  # every string valid UTF-8 <=> the bytes are, and no offset splits a character
            if strs is None:
                bounds = off.tolist()
                strs = [raw[a:b].decode("utf-8") for a, b in zip(bounds[:-1], bounds[1:])]
        except UnicodeDecodeError as e:
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as e2:
                raise ModelFileError(f"{path}: tensor {names['utf8']} is not valid UTF-8 (byte {e2.start})") from None
            raise ModelFileError(f"{path}: tensor {names['offsets']} splits a UTF-8 character ({e.reason})") from None
        longest = max(map(len, strs), default=0)
        if longest > limits.max_id_chars:
            raise ModelFileError(f"{path}: tensor {names['utf8']} holds a string of {longest} characters "
                                 f"(limit max_id_chars={limits.max_id_chars})")
    if kind == "int":
        if len(ints) > max_count:
            raise ModelFileError(f"{path}: tensor {names['int']} holds {len(ints)} ids (limit {max_count})")
        if distinct and _has_repeats(ints):
            raise ModelFileError(f"{path}: tensor {names['int']} has duplicate ids")
        return ints
    if kind == "str":
        if distinct and len(set(strs)) != len(strs):
            raise ModelFileError(f"{path}: the list {name} ({names['utf8']}) has duplicate ids")
        return strs
    mask = _list_tensor(tensors, names["is_str"], np.bool_, path)
    n_str = int(mask.sum())
    if len(mask) > max_count or n_str != len(strs) or len(mask) - n_str != len(ints):
        raise ModelFileError(f"{path}: tensor {names['is_str']} of {len(mask)} entries ({n_str} strings) does not "
                             f"match {len(ints)} ints and {len(strs)} strings (limit {max_count} entries)")
    if distinct and (_has_repeats(ints) or len(set(strs)) != len(strs)):
        raise ModelFileError(f"{path}: the list {name} has duplicate ids")
    out = [None] * len(mask)
    si, ii = iter(strs), iter(ints.tolist())
    for j, s in enumerate(mask.tolist()):
        out[j] = next(si) if s else next(ii)
    return out


# ---------------------------------------------------------------------------- reader

def read_model_file(path, limits: Optional[LoadLimits] = None) -> Tuple[Dict[str, "torch.Tensor"], dict]:
    """Read and verify a model file; returns (tensors, metadata): :func:`read_model_arrays`
    with every array as a torch tensor.
    """
    import torch

    arrays, meta = read_model_arrays(path, limits)
    return {name: torch.from_numpy(a) for name, a in arrays.items()}, meta


def read_model_arrays(path, limits: Optional[LoadLimits] = None) -> Tuple[Dict[str, np.ndarray], dict]:
    """Read and verify a model file without torch; returns (numpy arrays, metadata).

    Parameters
    ----------
    path : str or Path
    limits : LoadLimits, optional
        The bounds (default :class:`LoadLimits` ()).

    Raises
    ------
    FileNotFoundError
        if there is no file at ``path``.
    ModelFileError
        if the file is truncated, malformed, exceeds a limit or fails its SHA-256.
    """
    limits = DEFAULT_LIMITS if limits is None else limits
    if not isinstance(limits, LoadLimits):
        raise TypeError(f"limits must be a LoadLimits, got {type(limits).__name__}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no model file at {str(path)!r}")
    remove_stale_temp_files(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size > limits.max_file_bytes:
            raise ModelFileError(f"{path}: the file has {size} bytes (limit max_file_bytes={limits.max_file_bytes})")
        head = f.read(8)
        if len(head) < 8:
            raise ModelFileError(f"{path}: truncated ({size} bytes, no header)")
        (hlen,) = struct.unpack("<Q", head)
        if hlen > limits.max_header_bytes:  # O(1): before a byte of the header is read
            raise ModelFileError(
                f"{path}: header length {hlen} exceeds max_header_bytes={limits.max_header_bytes} (a file of "
                f"format 1 or 2 with large id maps may need up to LoadLimits(max_header_bytes={LEGACY_MAX_HEADER}); "
                f"re-saving it writes format {FORMAT_VERSION}, whose header is small)")
        if 8 + hlen > size:
            raise ModelFileError(f"{path}: header length {hlen} does not fit the file ({size} bytes): "
                                 f"truncated or corrupt")
        raw = f.read(hlen)
        if len(raw) != hlen:
            raise ModelFileError(f"{path}: truncated while reading the header")
        data_len = size - 8 - hlen
        if not raw.startswith(b"{"):
            raise ModelFileError(f"{path}: header does not start with '{{': not a safetensors file")
        header = _bounded_json(raw, "header", path, limits, data_len // 16)
        if not isinstance(header, dict):
            raise ModelFileError(f"{path}: header is not a JSON object")
        md = header.pop("__metadata__", None)
        if not isinstance(md, dict) or not isinstance(md.get("recmeta"), str):
            raise ModelFileError(f"{path}: not a recmeta model file (no recmeta metadata)")
        try:
            meta_raw = md["recmeta"].encode("utf-8")
        except UnicodeEncodeError:
            raise ModelFileError(f"{path}: metadata is not valid UTF-8") from None
        meta = _bounded_json(meta_raw, "metadata", path, limits, data_len // 16)
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            fmt = meta.get("format") if isinstance(meta, dict) else None
            raise ModelFileError(f"{path}: not a recmeta model file (format {_short(fmt)})")
        fv = meta.get("format_version")
        if isinstance(fv, bool) or not isinstance(fv, int) or fv not in READABLE_VERSIONS:
            raise ModelFileError(f"{path}: unsupported format_version {_short(fv)} "
                                 f"(this version reads {', '.join(map(str, READABLE_VERSIONS))})")
        if not isinstance(meta.get("sha256"), str):
            raise ModelFileError(f"{path}: sha256 is missing or not a string")
        for key in ("library_version", "torch_version"):
            v = meta.get(key)
            if v is not None and (not isinstance(v, str) or len(v) > 256):
                raise ModelFileError(f"{path}: {key} must be a short string, got {_short(v)}")
        if len(header) > limits.max_tensors:
            raise ModelFileError(f"{path}: {len(header)} tensors (limit max_tensors={limits.max_tensors})")
        spans = []
        for name, info in header.items():
            if not isinstance(info, dict) or not isinstance(info.get("dtype"), str) or info["dtype"] not in _DTYPES:
                dt = info.get("dtype") if isinstance(info, dict) else info
                raise ModelFileError(f"{path}: tensor {name!r} has an unknown dtype {_short(dt)}")
            shape, offs = info.get("shape"), info.get("data_offsets")
            if (not isinstance(shape, list) or len(shape) > limits.max_rank
                    or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s <= data_len for s in shape)):
                raise ModelFileError(f"{path}: tensor {name!r} has a malformed shape {_short(shape)} "
                                     f"(a list of at most {limits.max_rank} ints in [0, {data_len}])")
            if (not isinstance(offs, list) or len(offs) != 2
                    or not all(isinstance(o, int) and not isinstance(o, bool) and 0 <= o <= data_len for o in offs)):
                raise ModelFileError(f"{path}: tensor {name!r} has malformed data_offsets {_short(offs)} "
                                     f"(two ints in [0, {data_len}])")
            nbytes = math.prod(shape) * np.dtype(_DTYPES[info["dtype"]]).itemsize  # exact: Python ints
            if offs[1] - offs[0] != nbytes:
                raise ModelFileError(f"{path}: tensor {name!r} of shape {shape} {info['dtype']} needs {nbytes} bytes: "
                                     f"it does not fit the data area at data_offsets {offs} (truncated or inconsistent)")
            spans.append((offs[0], offs[1]))
        spans.sort()
        pos = 0
        for a, b in spans:
            if a != pos:
                raise ModelFileError(f"{path}: tensor data areas overlap or leave gaps (at byte {min(a, pos)})")
            pos = b
        if pos != data_len:
            raise ModelFileError(f"{path}: {data_len - pos} unexpected bytes after the tensors")
        data = f.read(data_len)
    if len(data) != data_len:
        raise ModelFileError(f"{path}: truncated while reading")
    view = memoryview(data)
    arrays = {name: (info["dtype"], tuple(info["shape"]), view[info["data_offsets"][0]:info["data_offsets"][1]])
              for name, info in header.items()}
    try:
        digest = _digest(meta, arrays)
    except ValueError as e:  # e.g. NaN or an unhashable value json.dumps refuses
        raise ModelFileError(f"{path}: metadata cannot be hashed ({e})") from None
    if digest != meta["sha256"]:
        raise ModelFileError(f"{path}: SHA-256 mismatch: the file was modified or corrupted")
    out = {}
    for name, (dt, shape, buf) in arrays.items():
        out[name] = np.frombuffer(buf, dtype=_DTYPES[dt]).reshape(shape).copy()
    return out, meta


# ---------------------------------------------------------------------------- load checks
# (shared by the model loader, recmeta_sdk.api.load, and the torch-free serving loader)

def ids_from_tensors(d, tensors: dict, path, what: str, limit: int, limits: LoadLimits, used: set) -> np.ndarray:
    """A format-3 id map: the metadata entry ``{"kind": "int" | "str"}`` and its tensors, checked
    (:func:`list_from_tensors`: counts, offsets, UTF-8, lengths, distinct); the names of the
    tensors read are added to ``used``. Returns int64 ids or an object array of strings."""
    if not isinstance(d, dict) or set(d) != {"kind"} or d["kind"] not in ("int", "str"):
        raise ModelFileError(f"{path}: malformed id map {what} {_short(d)} (format 3: {{'kind': 'int' or 'str'}}, "
                             f"the ids in the tensors lists.{what}.*)")
    vals = list_from_tensors(tensors, what, d["kind"], path, limit, limits)
    used.update(list_tensor_names(what))
    return vals if d["kind"] == "int" else np.asarray(vals, dtype=object)


def check_csr(off: np.ndarray, idx: np.ndarray, n_rows: int, what: str, path) -> None:
    """Refuse (:class:`ModelFileError`) offsets that are not a non-decreasing ``0 .. len(idx)``
    sequence or indices outside ``[0, n_rows)``."""
    if len(off) == 0 or off[0] != 0 or (np.diff(off) < 0).any() or off[-1] != len(idx):
        raise ModelFileError(f"{path}: {what} offsets are not a non-decreasing 0..{len(idx)} sequence")
    if len(idx) and (idx.min() < 0 or idx.max() >= n_rows):
        bad = int(idx.min()) if idx.min() < 0 else int(idx.max())
        raise ModelFileError(f"{path}: {what} index {bad} is out of range [0, {n_rows})")


def check_values(t, name: str, bound: float, path) -> None:
    """Refuse (:class:`ModelFileError`) a float tensor or array with a non-finite value or one
    above ``bound`` in absolute value."""
    a = t if isinstance(t, np.ndarray) else t.numpy()
    if a.size and not (np.isfinite(a).all() and float(np.abs(a).max()) <= bound):
        bad = a[~np.isfinite(a)] if not np.isfinite(a).all() else a.flat[int(np.abs(a).argmax())]
        raise ModelFileError(f"{path}: tensor {name} holds {float(np.ravel(bad)[0])!r}: its values must be finite and "
                             f"at most {bound:g} in absolute value")
