"""Shared by the Triton test modules (test_triton_kernels, test_triton_fuzz): the interpreter
switch, set on import and so before any kernel module is imported (``triton.jit`` reads it),
the device the kernels run on, and the check that a GPU path and the compiled core agree."""
from __future__ import annotations

import os

import pytest
import torch

try:
    HAS_GPU = torch.cuda.is_available()
except Exception:  # pragma: no cover
    HAS_GPU = False
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

#: where the kernels' tensors live: the CPU under the interpreter, else the GPU
DEV = "cuda" if HAS_GPU and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"


def same_outcome(run_gpu, run_cpp, *, atol: float):
    """Both raise ValueError with the same message (returned), or both return the same results
    (floats within rtol 1e-5 and ``atol``, integers equal; None returned)."""
    try:
        want = run_cpp()
    except ValueError as e:
        with pytest.raises(ValueError) as got:
            run_gpu()
        assert str(got.value) == str(e)
        return str(e)
    got = run_gpu()
    for a, b in zip(got, want):
        if a.dtype.is_floating_point:
            torch.testing.assert_close(a.cpu(), torch.as_tensor(b), rtol=1e-5, atol=atol)
        else:
            assert torch.equal(a.cpu(), torch.as_tensor(b))
    return None
