"""The backend table (recmeta_sdk.ops.backends): every (op, device, dtype) resolves or is refused
naming itself and the backends that exist; ``backend=`` beats ``RECMETA_BACKEND`` beats the
default; what the table says runs is what runs; the GPU launchers check their arguments with the
CPU path's checks (the same message for the same bad input)."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from recmeta_sdk import ops
from recmeta_sdk.ops import _gpu, _native, backends
from recmeta_sdk.ops import reference as R
from recmeta_sdk.ops._common import check_bags

CELLS = list(itertools.product(backends.OPS, backends.DEVICES, backends.DTYPES))


def _row(op, device, dtype):
    return [e for e in backends.table() if (e.op, e.device, e.dtype) == (op, device, dtype)]


def test_table_rows_are_well_formed():
    rows = backends.table()
    assert rows and all(e.op in backends.OPS and e.device in backends.DEVICES and e.dtype in backends.DTYPES
                        for e in rows)
    for op, device, dtype in CELLS:
        row = _row(op, device, dtype)
        assert [e.rank for e in row] == list(range(len(row)))
        assert len({e.backend for e in row}) == len(row)
        for e in row:
            assert e.backend in backends.BACKENDS and e.runs in backends.BACKENDS and e.note
            if device == "cpu":
                assert e.backend in ("cpp", "torch") and e.runs in ("cpp", "torch")
            else:
                assert e.backend != "cpp" and e.runs != "cpp"
    # every op runs somewhere on the CPU, with the reference as the last resort
    for op in backends.OPS:
        assert _row(op, "cpu", "float32")[-1].backend == "torch"
    text = backends.format_table()
    assert all(op in text for op in backends.OPS) and "none (refused)" in text


@pytest.mark.parametrize("op,device,dtype", CELLS)
def test_every_cell_resolves_or_refuses_naming_itself(op, device, dtype, monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    row = _row(op, device, dtype)
    names = [e.backend for e in row]
    usable = [b for b in names if backends.available(b)]
    if usable:
        assert backends.select(op, device, dtype) == usable[0]
    else:
        with pytest.raises(backends.BackendError) as e:
            backends.select(op, device, dtype)
        assert f"{op} on {device} {dtype}" in str(e.value)
    for b in backends.BACKENDS:
        if not backends.available(b):
            with pytest.raises(RuntimeError, match=f"backend '{b}' is not available"):
                backends.select(op, device, dtype, b)
        elif b in names:
            assert backends.select(op, device, dtype, b) == b
        else:
            with pytest.raises(backends.BackendError) as e:
                backends.select(op, device, dtype, b)
            msg = str(e.value)
            assert f"{op} on {device} {dtype}: backend '{b}' cannot run it" in msg
            assert (f"the backends for it: {', '.join(names)}" in msg) if names else ("no backend runs it" in msg)


def test_unknown_names_are_refused():
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        backends.select("policy_topk", "cpu", "float32", "gpu")
    with pytest.raises(ValueError, match="unknown op 'topk'"):
        backends.select("topk", "cpu", "float32")
    with pytest.raises(ValueError, match="unknown device 'mps'"):
        backends.select("policy_topk", "mps", "float32")
    with pytest.raises(ValueError, match="unknown dtype 'int4'"):
        backends.select("policy_topk", "cpu", "int4")


def test_backend_argument_beats_the_env_var_which_beats_the_default(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    default = backends.select("policy_topk", "cpu", "float32")
    assert default == ("cpp" if backends.available("cpp") else "torch")
    monkeypatch.setenv(backends.ENV_VAR, "torch")
    assert backends.select("policy_topk", "cpu", "float32") == "torch"
    assert backends.resolve(None, "cpu") == "torch"
    if backends.available("cpp"):
        assert backends.select("policy_topk", "cpu", "float32", "cpp") == "cpp"
    monkeypatch.setenv(backends.ENV_VAR, "no-such-backend")
    with pytest.raises(ValueError, match="unknown backend 'no-such-backend'"):
        backends.select("embedding_bag", "cpu", "float32")
    assert backends.select("embedding_bag", "cpu", "float32", "torch") == "torch"  # the argument wins
    monkeypatch.setenv(backends.ENV_VAR, "")  # empty: unset
    assert backends.select("policy_topk", "cpu", "float32") == default
    monkeypatch.setenv(backends.ENV_VAR, "torch")
    with pytest.raises(backends.BackendError, match="policy_topk on cpu bfloat16"):
        backends.select("policy_topk", "cpu", "bfloat16")


def test_env_var_reaches_the_ops(monkeypatch):
    calls = []
    real = backends.select
    monkeypatch.setattr(backends, "select", lambda *a: calls.append(a) or real(*a))
    rng = np.random.default_rng(0)
    u = rng.standard_normal((2, 3)).astype(np.float32)
    items = rng.standard_normal((5, 3)).astype(np.float32)
    monkeypatch.setenv(backends.ENV_VAR, "torch")
    ops.policy_topk(u, items, 2)
    ops.policy_sample(u, ops.quantize(items, "int8"), 2, seed=1)
    ops.embedding_bag(torch.from_numpy(items).to(torch.bfloat16), np.array([0, 1]), np.array([0, 2]))
    assert calls == [("policy_topk", "cpu", "float32", None), ("policy_sample", "cpu", "int8", None),
                     ("embedding_bag", "cpu", "bfloat16", None)]


# ---------------------------------------------------------------------------------------
# what the table says runs is what runs (CPU rows: the compiled core called or not)
# ---------------------------------------------------------------------------------------
def _tab(dtype, n=7, d=4):
    w = torch.from_numpy(np.random.default_rng(3).standard_normal((n, d)).astype(np.float32))
    if dtype == "int8":
        return ops.quantize(w, "int8")
    return w.to(getattr(torch, dtype))


_IDX, _OFF = torch.tensor([0, 3, 3, 6, 1]), torch.tensor([0, 2, 5])


def _call(op, dtype, backend):
    tab = _tab(dtype)
    kw = {"backend": backend}
    if op == "embedding_bag":
        return ops.embedding_bag(tab, _IDX, _OFF, **kw)
    if op == "embedding_bag_max":
        return ops.embedding_bag(tab, _IDX, _OFF, mode="max", **kw)
    if op == "embedding_bag_freq":
        return ops.embedding_bag(tab, _IDX, _OFF, scale_grad_by_freq=True, **kw)
    if op == "embedding_bag_table_offsets":
        return ops.embedding_bag(tab, _IDX % 3, torch.tensor([0, 1, 2, 4, 5]), table_offsets=[0, 3, 7], **kw)
    grad = torch.ones(2, 4)
    if op == "embedding_bag_backward":
        return ops.embedding_bag_backward(tab, _IDX, _OFF, grad, **kw)
    if op == "embedding_bag_backward_tbe":
        return ops.embedding_bag_backward([tab, tab.clone()], _IDX % 3, torch.tensor([0, 1, 2, 4, 5]),
                                          torch.ones(2, 8), **kw)
    if op == "embedding_bag_backward_table_offsets":
        return ops.embedding_bag_backward(tab, _IDX % 3, torch.tensor([0, 1, 2, 4, 5]), torch.ones(2, 8),
                                          table_offsets=[0, 3, 7], **kw)
    u = torch.ones(2, 4)
    if op == "policy_topk":
        return ops.policy_topk(u, tab, 3, **kw)
    return ops.policy_sample(u, tab, 3, seed=5, **kw)


CPU_RUNS = [(e.op, e.dtype, e.backend, e.runs) for e in backends.table() if e.device == "cpu"]


@pytest.mark.skipif(not backends.available("cpp"), reason="the compiled core is not built")
@pytest.mark.parametrize("op,dtype,backend,runs", CPU_RUNS)
def test_what_the_table_says_runs_runs(op, dtype, backend, runs, monkeypatch):
    backends.describe()  # the probes (which load the core) before counting
    real, calls = _native.core, []
    monkeypatch.setattr(_native, "core", lambda: calls.append(1) or real())
    _call(op, dtype, backend)
    assert bool(calls) == (runs == "cpp"), (op, dtype, backend, runs, len(calls))


# ---------------------------------------------------------------------------------------
# one set of argument checks for the CPU path and the GPU launchers (D8)
# ---------------------------------------------------------------------------------------
def _policy_args():
    rng = np.random.default_rng(1)
    u = torch.from_numpy(rng.standard_normal((3, 4)).astype(np.float32))
    items = torch.from_numpy(rng.standard_normal((9, 4)).astype(np.float32))
    return dict(user_states=u, items=items, k=2, bias=None, exclude=None, candidates=None, temperature=1.0)


def _bad(**change):
    a = _policy_args()
    a.update(change)
    return a


_NAN_U = _policy_args()["user_states"].clone()
_NAN_U[1, 2] = float("nan")
BAD_POLICY = {
    "bool temperature": _bad(temperature=True),
    "zero temperature": _bad(temperature=0.0),
    "nan temperature": _bad(temperature=float("nan")),
    "float k": _bad(k=1.5),
    "bool k": _bad(k=True),
    "negative k": _bad(k=-1),
    "float64 users": _bad(user_states=torch.zeros(3, 4, dtype=torch.float64)),
    "users of another width": _bad(user_states=torch.zeros(3, 5)),
    "nan user": _bad(user_states=_NAN_U),
    "float64 bias": _bad(bias=torch.zeros(9, dtype=torch.float64)),
    "short bias": _bad(bias=torch.zeros(8)),
    "nan bias": _bad(bias=torch.tensor([0.0] * 8 + [float("nan")])),
    "+inf bias": _bad(bias=torch.tensor([float("inf")] + [0.0] * 8)),
    "exclude id out of range": _bad(exclude=(torch.tensor([0, 1, 1, 2]), torch.tensor([3, 9]))),
    "exclude offsets short": _bad(exclude=(torch.tensor([0, 1, 2]), torch.tensor([3, 4]))),
    "candidates not a pair": _bad(candidates=torch.tensor([0, 1])),
    "int64 table": _bad(items=torch.zeros(9, 4, dtype=torch.int64)),
}


def _error(fn):
    with pytest.raises((ValueError, TypeError)) as e:
        fn()
    return type(e.value), str(e.value)


@pytest.mark.parametrize("case", list(BAD_POLICY))
@pytest.mark.parametrize("sample", [False, True], ids=["topk", "sample"])
def test_gpu_launcher_refuses_what_the_cpu_path_refuses_with_its_message(case, sample):
    """The GPU launchers' checks (run here on CPU tensors: they come before the device check)
    are the CPU path's: before, gpu_policy_topk accepted a bool temperature."""
    a = BAD_POLICY[case]
    pos = (a["user_states"], a["items"], a["k"])
    kw = {n: a[n] for n in ("bias", "exclude", "candidates", "temperature")}
    if sample:
        cpu = [_error(lambda b=b: ops.policy_sample(*pos, seed=3, backend=b, **kw)) for b in ("torch", "cpp")
               if backends.available(b)]
        gpu = _error(lambda: _gpu.gpu_policy_sample(*pos, 3, **kw))
    else:
        cpu = [_error(lambda b=b: ops.policy_topk(*pos, backend=b, **kw)) for b in ("torch", "cpp")
               if backends.available(b)]
        gpu = _error(lambda: _gpu.gpu_policy_topk(*pos, **kw))
    assert all(c == cpu[0] for c in cpu)  # (the compiled core screens a bias as the others check it)
    assert gpu == cpu[0]


def test_gpu_launcher_checks_the_device_after_the_shared_checks():
    a = _policy_args()
    with pytest.raises(ValueError, match="user_states: expected a CUDA tensor, got device cpu"):
        _gpu.gpu_policy_topk(a["user_states"], a["items"], 2)


@pytest.mark.parametrize("lr,eps,mode,optimizer", [(True, 1e-8, "sum", "sgd"), (float("nan"), 1e-8, "sum", "sgd"),
                                                   (0.1, -1.0, "sum", "sgd"), (0.1, False, "sum", "sgd"),
                                                   (0.1, 1e-8, "max", "sgd"), (0.1, 1e-8, "sum", "adam")])
def test_gpu_backward_refuses_the_cpu_paths_options_with_its_message(lr, eps, mode, optimizer):
    """Before, the GPU backward accepted lr=True and named the options differently."""
    w, idx, off, g = torch.zeros(5, 3), torch.tensor([1, 2]), torch.tensor([0, 2]), torch.zeros(1, 3)
    kw = dict(mode=mode, optimizer=optimizer, lr=lr, eps=eps)
    cpu = _error(lambda: ops.embedding_bag_backward(w, idx, off, g, backend="torch", **kw))
    gpu = _error(lambda: _gpu.gpu_embedding_bag_backward(w, idx, off, g, **kw))
    assert gpu == cpu


@pytest.mark.parametrize("case", ["id out of range in table 1", "negative id", "offsets short", "psw nan",
                                  "bags not a multiple of the tables"])
def test_shared_bag_checks_name_what_the_core_names(case):
    """check_bags (the torch path's and the GPU launcher's checks) and the compiled core give
    the same message, the position counted in the whole indices array (the GPU launcher
    counted it within the table's slice before)."""
    tabs = [torch.zeros(5, 3), torch.zeros(4, 2)]
    idx, off, psw = torch.tensor([0, 1, 2, 3, 1, 2]), torch.tensor([0, 2, 3, 5, 6]), None
    if case == "id out of range in table 1":
        idx[4] = 4
    elif case == "negative id":
        idx[1] = -1
    elif case == "offsets short":
        off = torch.tensor([0, 2, 3, 6])
    elif case == "psw nan":
        psw = torch.ones(6)
        psw[2] = float("nan")
    else:
        off = torch.tensor([0, 2, 6])
        tabs = tabs + [torch.zeros(3, 1)]
    want = _error(lambda: check_bags(tabs, idx, off, psw))
    for b in ("cpp", "torch"):
        if backends.available(b):
            assert _error(lambda: ops.embedding_bag(tabs, idx, off, per_sample_weights=psw, backend=b)) == want


def test_table_offsets_on_cuda_are_refused_by_the_table():
    """The GPU paths take a list of tables: the table refuses the one-table form on CUDA, naming
    it and where it runs (checked through select, which the op asks with these arguments)."""
    with pytest.raises(backends.BackendError, match="embedding_bag_table_offsets on cuda float32: no backend"):
        backends.select("embedding_bag_table_offsets", "cuda", "float32")
    q = R.quantize(torch.zeros(4, 2), "int8")
    from recmeta_sdk.ops._common import table_dtype

    assert table_dtype(q) == "int8" and table_dtype([torch.zeros(1, 1), torch.zeros(1, 1, dtype=torch.float64)]) \
        == "float64" and table_dtype(np.zeros((2, 2), np.float16)) == "float16"


def test_recmeta_env_prints_the_table(capsys, monkeypatch):
    from recmeta_sdk.cli import main

    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert "backend table" in out
    for line in backends.format_table().splitlines():
        assert line in out
    default = backends.select("policy_topk", "cpu", "float32")
    assert any(line.split()[:2] == ["policy_topk", "cpu"] and f"{default} *" in line for line in out.splitlines())


@pytest.mark.parametrize("case", ["id out of range", "offsets end early", "grad float64", "grad short", "psw nan",
                                  "state float64"])
def test_shared_update_checks_name_what_the_core_names(case):
    """check_update_inputs (the torch path's and the GPU backward's checks) refuses the
    one-table backward inputs as the torch path does, and as the compiled core does where its
    binding words the error the same (its dtype errors print numpy's dtype names)."""
    from recmeta_sdk.ops._common import check_update_inputs

    w, idx, off, g = torch.zeros(5, 3), torch.tensor([1, 2, 4]), torch.tensor([0, 2, 3]), torch.zeros(2, 3)
    psw, st = None, torch.zeros(5)
    if case == "id out of range":
        idx[2] = 5
    elif case == "offsets end early":
        off = torch.tensor([0, 1, 2])
    elif case == "grad float64":
        g = g.double()
    elif case == "grad short":
        g = torch.zeros(1, 3)
    elif case == "psw nan":
        psw = torch.tensor([1.0, float("nan"), 1.0])
    elif case == "state float64":
        st = st.double()
    want = _error(lambda: check_update_inputs(5, 3, idx, off, g, psw, st))
    for b in ("torch",) if "float64" in case else ("cpp", "torch"):
        if backends.available(b):
            got = _error(lambda: ops.embedding_bag_backward(w.clone(), idx, off, g, per_sample_weights=psw,
                                                            optimizer="rowwise_adagrad", state=st.clone(), backend=b))
            assert got == want, b
