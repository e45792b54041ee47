"""A non-finite row_scale / row_min of an int8 table: the same ValueError, word for word, on the
cpp and torch backends (policy_topk, policy_sample; embedding_bag names the part and row)."""
import numpy as np
import pytest
import torch

from recmeta_sdk import ops
from recmeta_sdk.ops.reference import QuantizedTable


def _error(fn):
    with pytest.raises(ValueError) as e:
        fn()
    return str(e.value)


@pytest.mark.parametrize("pos", [0, 7, 130])
@pytest.mark.parametrize("which,bad", [("row_scale", np.nan), ("row_min", np.inf), ("row_scale", -np.inf)])
def test_int8_scale_errors_match_across_backends(pos, which, bad):
    rng = np.random.default_rng(20261207 + pos)
    N, d, B = 131, 6, 3
    u = rng.standard_normal((B, d)).astype(np.float32)
    q = ops.quantize(torch.from_numpy(rng.standard_normal((N, d)).astype(np.float32)), "int8")
    arr = getattr(q, which).clone()
    arr[pos] = bad
    tab = QuantizedTable("int8", q.data, arr if which == "row_scale" else q.row_scale,
                         arr if which == "row_min" else q.row_min)
    cand = (np.array([0, 2, 3, 4]), np.array([1, pos, pos, (pos + 1) % N]))
    want = f"items: non-finite row_scale/row_min at row {pos}"
    for kw in ({}, {"candidates": cand}):
        for op in (lambda be: ops.policy_topk(u, tab, 4, backend=be, **kw),
                   lambda be: ops.policy_sample(u, tab, 4, seed=3, backend=be, **kw)):
            assert _error(lambda: op("cpp")) == _error(lambda: op("torch")) == want
    idx = torch.tensor([pos, (pos + 1) % N, pos])
    off = torch.tensor([0, 2, 3])
    got = {be: _error(lambda: ops.embedding_bag(tab, idx, off, backend=be)) for be in ("cpp", "torch")}
    assert got["cpp"] == got["torch"]
    assert f"row {pos} has a non-finite {which}" in got["cpp"]
