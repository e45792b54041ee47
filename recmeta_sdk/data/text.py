"""Dense item features from text (optional extra ``text``: ``pip install recmeta[text]``).

::

    from recmeta_sdk.data.text import embed_texts
    items["title_vec"] = list(embed_texts(items["title"].tolist()))   # (n, d) float32
    model = rm.train(log, items=items)          # the column becomes a dense item feature
    model = model.add_items(new_items)          # new items are recommended from their text

:func:`embed_texts` runs a sentence-transformers model (downloaded by sentence-transformers
on first use, or read from its cache) or any host-supplied ``encoder`` object with an
``encode(list[str]) -> array`` method, so a host can plug in its own model.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

logger = logging.getLogger("recmeta")

__all__ = ["DEFAULT_MODEL", "embed_texts"]

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"

_models: dict = {}


def _sentence_transformer(model_name: str):
    model = _models.get(model_name)
    if model is None:
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError as e:
            raise ImportError(
                "recmeta_sdk.data.text.embed_texts needs the optional extra 'text' (sentence-transformers): "
                "pip install 'recmeta[text]', or pass encoder= an object with an encode(list[str]) method"
            ) from e
        model = SentenceTransformer(model_name)
        _models[model_name] = model
    return model


def embed_texts(texts: Sequence[str], model_name: str = DEFAULT_MODEL, *, batch_size: int = 64,
                encoder: Any | None = None, normalize: bool = True) -> np.ndarray:
    """Embed ``texts`` into an (n, d) float32 array (one row per text, in order).

    Parameters
    ----------
    texts : sequence of str (None / NaN are embedded as the empty string)
    model_name : the sentence-transformers model (used when ``encoder`` is None)
    batch_size : texts per ``encode`` call (int >= 1)
    encoder : optional object with ``encode(list[str]) -> array (len, d)``; used instead of
        sentence-transformers (which is then not needed)
    normalize : scale each row to unit L2 norm (rows of norm 0 stay 0)

    Raises
    ------
    ImportError
        naming the ``text`` extra when sentence-transformers is not installed and no
        ``encoder`` is given.
    TypeError / ValueError
        for bad texts, a bad batch size, or an encoder output that is not a finite
        (len, d) array with the same d for every batch.
    """
    if isinstance(texts, (str, bytes)):
        raise TypeError("texts must be a sequence of strings, not a single string")
    try:
        items = list(texts)
    except TypeError:
        raise TypeError(f"texts must be a sequence of strings, got {type(texts).__name__}") from None
    clean = []
    for i, t in enumerate(items):
        if t is None or (isinstance(t, float) and math.isnan(t)):
            clean.append("")
        elif isinstance(t, str):
            clean.append(t)
        else:
            raise TypeError(f"texts[{i}] is {type(t).__name__} {t!r}, expected str")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if encoder is None:
        st = _sentence_transformer(model_name)

        def run(chunk):
            return st.encode(chunk, batch_size=int(batch_size), convert_to_numpy=True, show_progress_bar=False)
    else:
        if not callable(getattr(encoder, "encode", None)):
            raise TypeError(f"encoder must have an encode(list[str]) method, got {type(encoder).__name__}")
        run = encoder.encode
    parts = []
    dim = None
    for s in range(0, len(clean), int(batch_size)):
        chunk = clean[s:s + int(batch_size)]
        out = run(chunk)
        if hasattr(out, "detach"):  # a torch tensor
            out = out.detach().cpu().numpy()
        arr = np.asarray(out, dtype=np.float32)
        if arr.ndim != 2 or arr.shape[0] != len(chunk):
            raise ValueError(f"encoder returned shape {arr.shape} for {len(chunk)} texts, expected ({len(chunk)}, d)")
        if dim is not None and arr.shape[1] != dim:
            raise ValueError(f"encoder returned width {arr.shape[1]} after width {dim}")
        if not np.isfinite(arr).all():
            raise ValueError(f"encoder returned non-finite values for texts {s}..{s + len(chunk) - 1}")
        dim = arr.shape[1]
        parts.append(arr)
    if not parts:
        d = dim if dim is not None else _probe_dim(run)
        return np.zeros((0, d), np.float32)
    emb = np.concatenate(parts).astype(np.float32, copy=False)
    if normalize:
        n = np.linalg.norm(emb, axis=1, keepdims=True)
        emb = np.where(n > 0, emb / np.where(n > 0, n, 1.0), 0.0).astype(np.float32)
    return np.ascontiguousarray(emb)


def _probe_dim(run) -> int:
    arr = np.asarray(run([""]), dtype=np.float32)
    if arr.ndim != 2 or arr.shape[0] != 1:
        raise ValueError(f"encoder returned shape {arr.shape} for 1 text, expected (1, d)")
    return int(arr.shape[1])
