"""Distributed training (``recmeta_sdk.training.distributed``) on 2 gloo processes.

The ranks run ``tests/_distributed_worker.py``: launched by ``torchrun`` (the CLI path) or as
two plain processes with the torchrun environment (the kill test: torchrun's agent would
stop the surviving rank itself). Every launch has a timeout, so a hang fails the test.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
tdist = pytest.importorskip("torch.distributed")
if not tdist.is_available() or not tdist.is_gloo_available():  # pragma: no cover
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "_distributed_worker.py")
sys.path.insert(0, os.path.join(ROOT, "tests"))
from _distributed_worker import CONFIG, tiny_log

#: a launch of 2 ranks must finish within this (seconds); a hang fails the test
LAUNCH_TIMEOUT = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict:
    """The workers' environment: they import the recmeta_sdk this test imports (the installed
    package in CI, the source tree with PYTHONPATH=.), on one thread each."""
    import recmeta_sdk

    env = dict(os.environ)
    pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(recmeta_sdk.__file__)))
    env["PYTHONPATH"] = pkg_parent + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


@pytest.fixture(scope="module")
def torchrun_out(tmp_path_factory):
    """``torchrun --nproc_per_node=2 tests/_distributed_worker.py train OUT`` (tables check,
    then the CLI's ``train`` with sharded item tables, then each rank loads the file)."""
    out = tmp_path_factory.mktemp("dist")
    log, _ = tiny_log()
    log.to_csv(out / "log.csv", index=False)
    _write_parquet_folder(log, out / "parquet")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", WORKER, "train", str(out)]
    p = subprocess.run(cmd, check=False, env=_env(), cwd=ROOT, capture_output=True, text=True,
                       timeout=LAUNCH_TIMEOUT)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return out


def _write_parquet_folder(log, folder) -> None:
    """The log as 3 hive-partitioned Parquet files of odd sizes and row groups (the user
    column named ``uid``)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    cuts = [0, 101, 102, len(log)]  # 101 rows, 1 row, the rest
    for k in range(3):
        part = log.iloc[cuts[k]:cuts[k + 1]].rename(columns={"user": "uid"})
        (folder / f"part={k}").mkdir(parents=True)
        pq.write_table(pa.Table.from_pandas(part, preserve_index=False), folder / f"part={k}" / "f.parquet",
                       row_group_size=37)


def test_sharded_parquet_read_trains_the_whole_log_model(torchrun_out):
    """Each rank reads only its share of the Parquet row groups (the shares make the log) and
    the model equals one process trained on the whole log read by pandas, within the parity
    tolerance."""
    import pandas as pd

    import recmeta_sdk as rm
    from recmeta_sdk.training.distributed import PARAM_ATOL, PARITY_TOL

    r0, r1 = (json.loads((torchrun_out / f"parquet{r}.json").read_text()) for r in (0, 1))
    total = r0["rows"]
    assert r1["rows"] == total == len(tiny_log()[0])
    assert r0["rows_read"] + r1["rows_read"] == total
    assert 0 < r0["rows_read"] < total and 0 < r1["rows_read"] < total
    assert r0["parts"] + r1["parts"] == 3 + 1 + -(-(total - 102) // 37)  # row groups of the 3 files
    two = rm.load(torchrun_out / "model_pq.recmeta")
    whole = pd.read_parquet(torchrun_out / "parquet").rename(columns={"uid": "user"})
    one = rm.train(whole, config=CONFIG, distributed=False)
    np.testing.assert_array_equal(one.user_ids, two.user_ids)
    np.testing.assert_array_equal(one.item_ids, two.item_ids)
    a, b = one._net.state_dict(), two._net.state_dict()
    for k in a:
        if a[k].is_floating_point() and a[k].numel():
            assert float((a[k] - b[k]).abs().max()) <= PARAM_ATOL, k
    s1, s2 = one.recommend(list(range(61)), k=37), two.recommend(list(range(61)), k=37)
    np.testing.assert_array_equal(s1.ids, s2.ids)
    fin = np.isfinite(s1.scores)
    err = np.abs(s1.scores[fin] - s2.scores[fin]).max() / np.abs(s1.scores[fin]).max()
    assert err <= PARITY_TOL, err


def test_sharded_tables_equal_unsharded_exactly(torchrun_out):
    for r in (0, 1):
        res = json.loads((torchrun_out / f"tables{r}.json").read_text())
        # 53 items with 0-3 weighted feature rows each, d = 13, split 26 / 27
        assert res["rows"] == ([0, 26] if r == 0 else [26, 53])
        assert res["lookup_exact"], res        # pooled item vectors bit-identical
        assert res["id_grad_exact"], res       # the shard's rows: the unsharded gradient exactly
        assert res["update_exact"], res        # and the same AdamW update
        assert res["unshard_exact"], res       # gathered back: the full table
        # the replicated feature rows' gradient is summed over the ranks: float order only
        assert res["feat_grad_maxdiff"] < 1e-5, res


def test_two_ranks_match_one_process(torchrun_out):
    import recmeta_sdk as rm
    from recmeta_sdk import cli
    from recmeta_sdk.training.distributed import PARAM_ATOL, PARITY_TOL

    path = torchrun_out / "model.recmeta"
    assert path.exists()
    assert [p.name for p in torchrun_out.iterdir() if p.name.startswith(".")] == []  # no temp file left
    two = rm.load(path)
    log, users, items = cli._read_log(str(torchrun_out / "log.csv"))
    one = rm.train(log, users=users, items=items, config=CONFIG, distributed=False)
    # every rank loaded the file rank 0 wrote, and serves the same
    r0, r1 = (json.loads((torchrun_out / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["rc"] == r1["rc"] == 0
    assert r0["ids"] == r1["ids"] and r0["scores"] == r1["scores"]
    # the same model as one process with the same seed and global batch (dropout 0)
    a, b = one._net.state_dict(), two._net.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        if a[k].is_floating_point() and a[k].numel():
            assert float((a[k] - b[k]).abs().max()) <= PARAM_ATOL, k
    users_ = list(range(61))
    s1, s2 = one.recommend(users_, k=37), two.recommend(users_, k=37)
    np.testing.assert_array_equal(s1.ids, s2.ids)
    fin = np.isfinite(s1.scores)
    np.testing.assert_array_equal(fin, np.isfinite(s2.scores))
    err = np.abs(s1.scores[fin] - s2.scores[fin]).max() / np.abs(s1.scores[fin]).max()
    assert err <= PARITY_TOL, err


def test_killed_rank_fails_clearly_and_writes_nothing(tmp_path):
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, WORKER, "kill", str(tmp_path)], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=_env(RANK=r, LOCAL_RANK=r, WORLD_SIZE=2, MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
             for r in (0, 1)]
    try:
        outs = [p.communicate(timeout=LAUNCH_TIMEOUT) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert procs[1].returncode == -9  # rank 1 killed itself in its third step
    assert procs[0].returncode != 0
    err = outs[0][1]
    assert "DistributedTrainingError" in err and "rank 0 of 2" in err and "training step 3" in err, err[-3000:]
    assert "another rank has probably died" in err
    assert list(tmp_path.iterdir()) == []  # no model file, no partial or temporary file


def test_distributed_needs_a_group_or_torchrun(monkeypatch):
    from recmeta_sdk.training import distributed as dist

    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    assert dist.resolve("auto") is None  # one process: the single-process path
    assert dist.resolve(False) is None
    with pytest.raises(ValueError, match="torchrun"):
        dist.resolve(True)
    with pytest.raises(ValueError, match="distributed must be"):
        dist.resolve("yes")
    with pytest.raises(ValueError, match="table_budget_bytes"):
        dist.DistributedConfig(table_budget_bytes=-1)
    with pytest.raises(ValueError, match="backend"):
        dist.DistributedConfig(backend="mpi")


@pytest.mark.gpu
def test_nccl_rank_trains_like_one_process(tmp_path):
    env = _env(RANK=0, LOCAL_RANK=0, WORLD_SIZE=1, MASTER_ADDR="127.0.0.1", MASTER_PORT=_free_port())
    p = subprocess.run([sys.executable, WORKER, "nccl", str(tmp_path)], check=False, env=env, cwd=ROOT,
                       capture_output=True,
                       text=True, timeout=LAUNCH_TIMEOUT)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((tmp_path / "nccl.json").read_text())
    assert res["backend"] == "nccl"
    assert res["same_ids"], res
    assert res["max_score_diff"] < 1e-4, res


def test_batch_parts_are_the_whole_batch():
    """The ranks' parts (make_batch part=) are the batch one process cuts, and every rank's
    rng ends where one process's does (user features included)."""
    import torch

    from recmeta_sdk.model.network import Config
    from recmeta_sdk.training.loop import make_batch, prepare

    log, _ = tiny_log()
    prep = prepare(log)
    cfg = Config(seed=1)
    users = np.random.default_rng(2).permutation(len(prep.user_ids))[:13]
    feats = (np.arange(len(prep.user_ids) + 1, dtype=np.int64), np.arange(len(prep.user_ids), dtype=np.int64) % 4)
    rng = np.random.default_rng(7)
    whole = make_batch(prep, users, cfg, rng, feats)
    after = rng.random()
    parts = []
    for part in (slice(0, 6), slice(6, 13), slice(13, 13)):  # the last rank's part is empty
        r = np.random.default_rng(7)
        parts.append(make_batch(prep, users, cfg, r, feats, part=part))
        assert r.random() == after
    assert [p.B for p in parts] == [6, 7, 0]
    assert torch.equal(torch.cat([p.users for p in parts]), whole.users)
    assert torch.equal(torch.cat([p.prefix for p in parts]), whole.prefix)
    for name in ("bag_idx", "bag_w", "sup_items", "sup_w", "q_items", "q_reward", "uf_idx"):
        assert torch.equal(torch.cat([getattr(p, name) for p in parts]), getattr(whole, name)), name
    assert torch.equal(torch.cat([p.seq for p in parts]), whole.seq)
    shifts = np.cumsum([0] + [p.B for p in parts])
    assert torch.equal(torch.cat([p.q_rows + s for p, s in zip(parts, shifts)]), whole.q_rows)
    assert torch.equal(torch.cat([p.bag_off[:-1] + int(w.bag_off[s]) for p, w, s in
                                  zip(parts, [whole] * 3, shifts)] + [whole.bag_off[-1:]]), whole.bag_off)


def test_table_budget_decides_sharding():
    """Above the budget the id rows are sharded; a shard still above it is refused, naming
    the ranks needed; under it (or shard_tables=False) the tables stay whole."""
    from types import SimpleNamespace

    from recmeta_sdk.model.network import Config, ItemFeatures, RecMetaNet
    from recmeta_sdk.training import distributed as dist

    N, d = 101, 4  # id rows: 2 * 101 * 4 * 4 = 3232 bytes; a shard of 51 items over 2 ranks: 1632
    feats = ItemFeatures(N, [], np.arange(N + 1, dtype=np.int64), np.arange(N, dtype=np.int64),
                         np.ones(N, np.float32))
    net = RecMetaNet(Config(dim=d, heads=1, encoder="none", wide="none"), feats, 0)
    assert dist.table_bytes(N, d) == 3232

    def ctx(**opts):
        return SimpleNamespace(options=dist.DistributedConfig(**opts), world_size=2, rank=0)

    assert dist.shard(net, ctx(table_budget_bytes=3232)) is False
    assert dist.shard(net, ctx(table_budget_bytes=10, shard_tables=False)) is False
    with pytest.raises(ValueError, match=r"3232 bytes .* 1632 per rank sharded over 2 ranks: above table_budget_bytes "
                                         r"1000; run on at least 4 ranks"):
        dist.shard(net, ctx(table_budget_bytes=1000))
    assert "emb_in" in dict(net.named_parameters())  # nothing changed
