"""Real datasets, fetched on demand from the Python packages that carry them.

``load("ml-100k")``
    MovieLens 100K (GroupLens; 943 users, 1,682 items, 100,000 ratings, user
    demographics, movie genres and years). Read from RecBole's atomic files inside the
    ``recbole==1.2.1`` wheel, or from GroupLens' own ``u.data`` / ``u.item`` / ``u.user``
    (or RecBole's ``ml-100k.inter`` / ``.item`` / ``.user``) in a folder given as
    ``path=``. MovieLens is not redistributed by this project (GroupLens' terms).
``load("obd", campaign="all", policy="random")``
    The Open Bandit Dataset sample (ZOZO, Inc.; Saito et al., "Open Bandit Dataset and
    Pipeline", NeurIPS Datasets and Benchmarks 2021) from the ``obp==0.5.7`` source
    distribution: 10,000 impressions per campaign (all / men / women) and logging policy
    (uniform random / Bernoulli Thompson sampling).

A package file missing from the cache is downloaded with ``pip download --no-deps`` (run
as a subprocess of the current interpreter, never at import time), checked against the
SHA-256 pinned below, and only the needed files are extracted to
``<cache_dir>/<dataset>/``. The cache folder is ``cache_dir``, else ``$RECMETA_CACHE``,
else the platform's user cache folder (``~/.cache/recmeta`` on Linux).
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

logger = logging.getLogger("recmeta")

__all__ = ["ARCHIVES", "DATASETS", "Dataset", "DatasetUnavailableError", "default_cache_dir", "fetch", "load"]


class DatasetUnavailableError(RuntimeError):
    """A dataset's package file could not be downloaded or failed verification."""


@dataclass(frozen=True)
class _Archive:
    requirement: str
    filename: str
    sha256: str
    pip_args: tuple
    members: dict  # member path inside archive -> file name in <cache>/<dataset>/


def _obd_members() -> dict:
    members = {}
    for policy in ("random", "bts"):
        for campaign in ("all", "men", "women"):
            base = f"obp-0.5.7/obp/dataset/obd/{policy}/{campaign}/"
            members[base + f"{campaign}.csv"] = f"{policy}/{campaign}/{campaign}.csv"
            members[base + "item_context.csv"] = f"{policy}/{campaign}/item_context.csv"
    return members


#: Package files carrying the datasets, with pinned SHA-256 digests.
ARCHIVES: dict = {
    "ml-100k": _Archive(
        requirement="recbole==1.2.1",
        filename="recbole-1.2.1-py3-none-any.whl",
        sha256="9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407",
        pip_args=("--only-binary", ":all:"),
        members={f"recbole/dataset_example/ml-100k/ml-100k.{ext}": f"ml-100k.{ext}" for ext in ("inter", "item", "user")},
    ),
    "obd": _Archive(
        requirement="obp==0.5.7",
        filename="obp-0.5.7.tar.gz",
        sha256="3060d67fedfcfadf1e7a6f2608987f74412b5eb74d2c567edeb147595c68f2a0",
        # obp 0.5.7 declares python<3.11; we only read its data files, never install it
        pip_args=("--no-binary", ":all:", "--ignore-requires-python"),
        members=_obd_members(),
    ),
}

DATASETS: tuple[str, ...] = tuple(ARCHIVES)


@dataclass
class Dataset:
    """A loaded dataset.

    Attributes
    ----------
    name : str
    interactions : DataFrame
        (n, c) columns ``user``, ``item`` and, where the data has them, ``timestamp``,
        ``reward``, ``propensity``, ``position``, then context columns.
    users, items : DataFrame or None
        Side features indexed by external user / item id.
    info : dict
        Source files and options.
    """

    name: str
    interactions: pd.DataFrame
    users: pd.DataFrame | None = None
    items: pd.DataFrame | None = None
    info: dict = field(default_factory=dict)

    def __repr__(self) -> str:
        parts = [f"name={self.name!r}", f"interactions={len(self.interactions)}"]
        if self.users is not None:
            parts.append(f"users={len(self.users)}")
        if self.items is not None:
            parts.append(f"items={len(self.items)}")
        return f"Dataset({', '.join(parts)})"


def default_cache_dir() -> Path:
    """The cache folder: ``$RECMETA_CACHE`` or the platform's user cache dir + ``recmeta``.

    Returns
    -------
    Path
        Linux: ``$XDG_CACHE_HOME/recmeta`` or ``~/.cache/recmeta``; macOS:
        ``~/Library/Caches/recmeta``; Windows: ``%LOCALAPPDATA%\\recmeta\\Cache``.
    """
    env = os.environ.get("RECMETA_CACHE")
    if env:
        return Path(env).expanduser()
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA") or str(Path.home() / "AppData" / "Local")
        return Path(base) / "recmeta" / "Cache"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "recmeta"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "recmeta"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _manual_hint(arc: _Archive, downloads: Path) -> str:
    return (
        f"Download {arc.filename} (SHA-256 {arc.sha256}) on a machine with access to PyPI, e.g. "
        f"`pip download --no-deps {' '.join(arc.pip_args)} {arc.requirement} -d DIR`, and put it at "
        f"{downloads / arc.filename} (or set RECMETA_CACHE / cache_dir= to a folder whose downloads/ holds it)."
    )


def _download(arc: _Archive, downloads: Path) -> Path:
    target = downloads / arc.filename
    downloads.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=downloads, prefix=".pip-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               *arc.pip_args, arc.requirement, "-d", tmp]
        logger.info("downloading %s: %s", arc.requirement, " ".join(cmd))
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise DatasetUnavailableError(f"could not run pip to fetch {arc.requirement}: {exc}. "
                                          + _manual_hint(arc, downloads)) from None
        got = Path(tmp) / arc.filename
        if proc.returncode != 0 or not got.exists():
            tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-3:]
            raise DatasetUnavailableError(
                f"pip could not download {arc.requirement} (exit {proc.returncode}: {' | '.join(tail)}). "
                + _manual_hint(arc, downloads)
            )
        os.replace(got, target)
    return target


def fetch(name: str, *, cache_dir: str | os.PathLike | None = None) -> Path:
    """Make sure a dataset's files are extracted in the cache and return their folder.

    Parameters
    ----------
    name : str
        One of :data:`DATASETS`.
    cache_dir : path, optional
        Cache folder (see :func:`default_cache_dir`).

    Returns
    -------
    Path
        ``<cache_dir>/<name>``, holding the extracted files.

    Raises
    ------
    ValueError
        If ``name`` is unknown.
    DatasetUnavailableError
        If the package file cannot be downloaded (the message says which file to fetch
        and where to put it) or its SHA-256 does not match the pinned one.
    """
    if name not in ARCHIVES:
        raise ValueError(f"unknown dataset {name!r}; available: {list(DATASETS)}")
    arc = ARCHIVES[name]
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    dest = root / name
    marker = dest / ".complete"
    if marker.exists() and marker.read_text().strip() == arc.sha256:
        return dest
    downloads = root / "downloads"
    archive = downloads / arc.filename
    if not archive.exists():
        archive = _download(arc, downloads)
    digest = _sha256(archive)
    if digest != arc.sha256:
        bad = archive.with_name(archive.name + ".bad")
        os.replace(archive, bad)
        raise DatasetUnavailableError(
            f"{archive} has SHA-256 {digest}, expected {arc.sha256}; moved it to {bad}. "
            + _manual_hint(arc, downloads)
        )
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}-"))
    try:
        _extract(archive, arc.members, tmp)
        (tmp / ".complete").write_text(arc.sha256 + "\n")
        if marker.exists() and marker.read_text().strip() == arc.sha256:
            return dest  # another process finished first; keep its copy
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("extracted %s from %s into %s", name, arc.filename, dest)
    return dest


def _extract(archive: Path, members: dict, dest: Path) -> None:
    wanted = dict(members)
    if archive.name.endswith((".whl", ".zip")):
        with zipfile.ZipFile(archive) as zf:
            names = set(zf.namelist())
            for member, out in wanted.items():
                if member not in names:
                    raise DatasetUnavailableError(f"{archive.name} lacks {member}")
                path = dest / out
                path.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(member) as src, open(path, "wb") as dst:
                    shutil.copyfileobj(src, dst)
    else:
        with tarfile.open(archive, "r:gz") as tf:
            found = set()
            for m in tf:
                if m.name in wanted and m.isfile():
                    path = dest / wanted[m.name]
                    path.parent.mkdir(parents=True, exist_ok=True)
                    src = tf.extractfile(m)
                    with src, open(path, "wb") as dst:
                        shutil.copyfileobj(src, dst)
                    found.add(m.name)
            missing = set(wanted) - found
            if missing:
                raise DatasetUnavailableError(f"{archive.name} lacks {sorted(missing)[:3]}")


# ---------------------------------------------------------------------------- loaders


def load(name: str, *, cache_dir: str | os.PathLike | None = None, **options: Any) -> Dataset:
    """Load a real dataset, downloading its package file into the cache if needed.

    Parameters
    ----------
    name : {"ml-100k", "obd"}
    cache_dir : path, optional
        Cache folder; default ``$RECMETA_CACHE`` or the user cache dir (never the
        working directory).
    **options
        ``ml-100k``: ``path`` -- a folder holding GroupLens' ``u.data``, ``u.item``,
        ``u.user`` or RecBole's ``ml-100k.inter``, ``.item``, ``.user`` (no download).
        ``obd``: ``campaign`` in {"all", "men", "women"} (default "all") and ``policy``
        in {"random", "bts"} (default "random").

    Returns
    -------
    Dataset
        ``ml-100k``: interactions ``user`` (int), ``item`` (int), ``timestamp`` (int,
        Unix seconds), ``reward`` (the rating, float); users ``age``, ``gender``,
        ``occupation``, ``zip_code``; items ``title``, ``release_year`` (nullable
        Int64), ``genres`` ('|'-separated).
        ``obd``: interactions ``user``, ``item`` (item_id), ``timestamp`` (UTC
        datetime), ``reward`` (click, float), ``propensity`` (propensity_score),
        ``position`` (1-3), then context ``campaign``, ``policy``,
        ``user_feature_0..3`` and ``user-item_affinity_*``; users: the four user
        features indexed by ``user``; items: the item context (``item_feature_*``)
        indexed by item id. OBD publishes no user id: ``user`` is
        ``"u"`` + the first 16 hex digits of the MD5 of the four (already hashed) user
        features joined by ``"|"``, so a "user" is a feature profile, stable across
        loads but possibly shared by several people.

    Raises
    ------
    ValueError
        If ``name`` or an option is unknown or invalid.
    DatasetUnavailableError
        If the data cannot be fetched (see :func:`fetch`).
    """
    if name == "ml-100k":
        return _load_ml100k(cache_dir=cache_dir, **options)
    if name == "obd":
        return _load_obd(cache_dir=cache_dir, **options)
    raise ValueError(f"unknown dataset {name!r}; available: {list(DATASETS)}")


GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
    "War", "Western",
)


def _load_ml100k(*, cache_dir=None, path: str | os.PathLike | None = None, **rest: Any) -> Dataset:
    if rest:
        raise ValueError(f"unknown option(s) for ml-100k: {sorted(rest)}; valid: ['path']")
    if path is not None:
        folder = Path(path).expanduser()
        if (folder / "u.data").exists():
            return _ml100k_grouplens(folder)
        if (folder / "ml-100k.inter").exists():
            return _ml100k_recbole(folder)
        raise ValueError(f"{folder} holds neither GroupLens' u.data/u.item/u.user nor RecBole's ml-100k.inter/.item/.user")
    return _ml100k_recbole(fetch("ml-100k", cache_dir=cache_dir))


def _read_atomic(path: Path) -> pd.DataFrame:
    """A RecBole atomic file: tab-separated, header ``name:type``."""
    header = path.open(encoding="utf-8").readline().rstrip("\n").split("\t")
    names = [h.split(":")[0] for h in header]
    types = {h.split(":")[0]: (h.split(":")[1] if ":" in h else "token") for h in header}
    dtype = {n: (str if t in ("token", "token_seq") else np.float64) for n, t in types.items()}
    return pd.read_csv(path, sep="\t", header=0, names=names, dtype=dtype, keep_default_na=False,
                       na_values={n: [""] for n in names}, quoting=3, encoding="utf-8")


def _ml100k_recbole(folder: Path) -> Dataset:
    inter = _read_atomic(folder / "ml-100k.inter")
    items = _read_atomic(folder / "ml-100k.item")
    users = _read_atomic(folder / "ml-100k.user")
    interactions = pd.DataFrame({
        "user": inter["user_id"].astype(np.int64).to_numpy(),
        "item": inter["item_id"].astype(np.int64).to_numpy(),
        "timestamp": inter["timestamp"].astype(np.int64).to_numpy(),
        "reward": inter["rating"].astype(np.float64).to_numpy(),
    })
    item_df = pd.DataFrame(
        {
            "title": items["movie_title"].to_numpy(),
            "release_year": pd.to_numeric(items["release_year"], errors="coerce").astype("Int64").array,
            "genres": items["class"].fillna("").str.split(" ").str.join("|").to_numpy(),
        },
        index=pd.Index(items["item_id"].astype(np.int64).to_numpy(), name="item"),
    )
    user_df = pd.DataFrame(
        {
            "age": users["age"].astype(np.int64).to_numpy(),
            "gender": users["gender"].to_numpy(),
            "occupation": users["occupation"].to_numpy(),
            "zip_code": users["zip_code"].to_numpy(),
        },
        index=pd.Index(users["user_id"].astype(np.int64).to_numpy(), name="user"),
    )
    return Dataset("ml-100k", interactions, user_df, item_df, info={"source": str(folder), "format": "recbole"})


def _ml100k_grouplens(folder: Path) -> Dataset:
    for f in ("u.data", "u.item", "u.user"):
        if not (folder / f).exists():
            raise ValueError(f"{folder} lacks GroupLens' {f}")
    inter = pd.read_csv(folder / "u.data", sep="\t", header=None, names=["user", "item", "reward", "timestamp"],
                        dtype={"user": np.int64, "item": np.int64, "reward": np.float64, "timestamp": np.int64})
    interactions = inter[["user", "item", "timestamp", "reward"]].reset_index(drop=True)
    cols = ["item", "title", "release_date", "video_release_date", "url", *GENRES]
    raw = pd.read_csv(folder / "u.item", sep="|", header=None, names=cols, encoding="latin-1",
                      dtype={"title": str, "release_date": str, "video_release_date": str, "url": str},
                      keep_default_na=False, na_values={"release_date": [""]})
    flags = raw[list(GENRES)].to_numpy(dtype=np.int64)
    genre_arr = np.array(GENRES, dtype=object)
    genres = ["|".join(genre_arr[row.astype(bool)]) for row in flags]  # 1,682 rows: side table only
    year = pd.to_datetime(raw["release_date"], format="%d-%b-%Y", errors="coerce").dt.year.astype("Int64")
    item_df = pd.DataFrame(
        {"title": raw["title"].to_numpy(), "release_year": year.array, "genres": genres},
        index=pd.Index(raw["item"].astype(np.int64).to_numpy(), name="item"),
    )
    u = pd.read_csv(folder / "u.user", sep="|", header=None, names=["user", "age", "gender", "occupation", "zip_code"],
                    dtype={"user": np.int64, "age": np.int64, "gender": str, "occupation": str, "zip_code": str})
    user_df = u.set_index("user")
    return Dataset("ml-100k", interactions, user_df, item_df, info={"source": str(folder), "format": "grouplens"})


OBD_CAMPAIGNS = ("all", "men", "women")
OBD_POLICIES = ("random", "bts")


def _load_obd(*, cache_dir=None, campaign: str = "all", policy: str = "random", **rest: Any) -> Dataset:
    if rest:
        raise ValueError(f"unknown option(s) for obd: {sorted(rest)}; valid: ['campaign', 'policy']")
    if campaign not in OBD_CAMPAIGNS:
        raise ValueError(f"obd campaign={campaign!r} is not one of {list(OBD_CAMPAIGNS)}")
    if policy not in OBD_POLICIES:
        raise ValueError(f"obd policy={policy!r} is not one of {list(OBD_POLICIES)}")
    folder = fetch("obd", cache_dir=cache_dir) / policy / campaign
    raw = pd.read_csv(folder / f"{campaign}.csv", index_col=0)
    ufeat = [f"user_feature_{i}" for i in range(4)]
    joined = raw[ufeat[0]].astype(str)
    for c in ufeat[1:]:
        joined = joined + "|" + raw[c].astype(str)
    user = "u" + joined.map(lambda s: hashlib.md5(s.encode("utf-8")).hexdigest()[:16])  # 10k rows
    interactions = pd.DataFrame({
        "user": user.to_numpy(),
        "item": raw["item_id"].to_numpy(dtype=np.int64),
        "timestamp": pd.to_datetime(raw["timestamp"], utc=True, format="ISO8601").array,
        "reward": raw["click"].to_numpy(dtype=np.float64),
        "propensity": raw["propensity_score"].to_numpy(dtype=np.float64),
        "position": raw["position"].to_numpy(dtype=np.int64),
        "campaign": campaign,
        "policy": policy,
    })
    context = raw[[c for c in raw.columns if c.startswith(("user_feature_", "user-item_affinity_"))]]
    interactions = pd.concat([interactions, context.reset_index(drop=True)], axis=1)
    ic = pd.read_csv(folder / "item_context.csv", index_col=0)
    items = ic.set_index(pd.Index(ic["item_id"].to_numpy(dtype=np.int64), name="item")).drop(columns="item_id")
    users = interactions[["user", *ufeat]].drop_duplicates("user").set_index("user")
    return Dataset("obd", interactions, users, items,
                   info={"source": str(folder), "campaign": campaign, "policy": policy})
