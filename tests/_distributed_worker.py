"""One rank of the distributed tests (``tests/test_distributed.py`` starts 2 of these with the
torchrun environment: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT).

``python tests/_distributed_worker.py MODE OUT_DIR``; MODE:

* ``train``: first the sharded item tables against the unsharded ones on random data of
  odd sizes (lookups, gradients, one AdamW update, the gathered tables:
  ``OUT_DIR/tables{r}.json``), then ``recmeta train`` (the CLI) on ``OUT_DIR/log.csv`` with
  the item tables sharded: rank 0 writes ``OUT_DIR/model.recmeta``, every rank loads it and
  writes its recommendations for users 0-2 to ``OUT_DIR/rank{r}.json``; then ``rm.train`` on
  the Parquet folder ``OUT_DIR/parquet``, each rank reading its share of the row groups.
* ``kill``: ``rm.train`` on a larger log; rank 1 kills itself (SIGKILL) in its third
  training step; rank 0 must raise ``DistributedTrainingError``, writing nothing.
"""
from __future__ import annotations

import json
import os
import signal
import sys

import numpy as np
import pandas as pd

# validation 0: distributed training has no validation-tuned path (the single-process default
# tunes on a validation split), so parity is between the same training path
CONFIG = {"epochs": 2, "batch_size": 16, "dim": 8, "hidden": 16, "seed": 3, "dropout": 0.0, "seq_len": 5,
          "validation": 0}


def tiny_log(n_users: int = 61, n_items: int = 37, seed: int = 0):
    """A small seeded log (star rewards, timestamps) and item genres; odd sizes."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        for i in rng.choice(n_items, int(rng.integers(3, 12)), replace=False):
            rows.append((u, int(i), float(rng.integers(1, 6)), len(rows)))
    log = pd.DataFrame(rows, columns=["user", "item", "reward", "timestamp"])
    genres = ["a", "b", "c"]
    items = pd.DataFrame({"genre": [genres[i % 3] + ("|d" if i % 4 == 0 else "") for i in range(n_items)]},
                         index=range(n_items))
    return log, items


def _train(out: str) -> None:
    """The tables check, then ``recmeta train`` (the CLI, as under torchrun) on ``OUT/log.csv``
    with the item tables sharded; each rank then loads the file rank 0 wrote."""
    import recmeta_sdk as rm
    from recmeta_sdk import cli

    _tables(out)
    path = os.path.join(out, "model.recmeta")
    rc = cli.main(["train", "--data", os.path.join(out, "log.csv"), "--out", path, "--config", json.dumps(CONFIG),
                   "--shard-tables", "--timeout", "60"])
    recs = rm.load(path).recommend([0, 1, 2], k=5)
    with open(os.path.join(out, f"rank{os.environ['RANK']}.json"), "w") as f:
        json.dump({"rc": rc, "ids": recs.ids.tolist(), "scores": recs.scores.tolist()}, f)
    _parquet(out)


def _parquet(out: str) -> None:
    """``rm.train`` on the Parquet folder ``OUT/parquet`` (written by the test): each rank reads
    its share of the row groups; rank 0 writes ``OUT/model_pq.recmeta``; each rank records what
    it read in ``OUT/parquet{r}.json``."""
    import recmeta_sdk as rm
    from recmeta_sdk.training import distributed as dist

    model = rm.train(os.path.join(out, "parquet"), columns={"uid": "user"}, config=CONFIG,
                     distributed=dist.DistributedConfig(timeout_s=60))
    dist.save(model, os.path.join(out, "model_pq.recmeta"))
    with open(os.path.join(out, f"parquet{os.environ['RANK']}.json"), "w") as f:
        json.dump(model.history["ingest"], f)


def _tables(out: str) -> None:
    import torch

    from recmeta_sdk.model.network import Config, ItemFeatures, RecMetaNet
    from recmeta_sdk.training import distributed as dist
    from recmeta_sdk.training.loop import AdamW

    ctx = dist.resolve(dist.DistributedConfig(shard_tables=True, backend="gloo", timeout_s=60))
    rank = ctx.rank
    rng = np.random.default_rng(11)
    N, F, d = 53, 7, 13  # odd sizes: 53 items split 26 / 27
    offsets, indices, weights = [0], [], []
    for i in range(N):
        feats = rng.choice(F, int(rng.integers(0, 4)), replace=False)
        indices += [i] + [N + int(f) for f in feats]
        weights += [1.0] + [float(w) for w in rng.uniform(0.1, 1.0, len(feats))]
        offsets.append(len(indices))
    feats = ItemFeatures(N, [f"f={j}" for j in range(F)], np.asarray(offsets, np.int64),
                         np.asarray(indices, np.int64), np.asarray(weights, np.float32))
    cfg = Config(dim=d, hidden=8, seq_len=3, encoder="none", wide="none", seed=5)
    ref, net = RecMetaNet(cfg, feats, 0), RecMetaNet(cfg, feats, 0)
    # each rank's upstream gradient; the sharded tables' gradient is that of their sum
    grads = [torch.from_numpy(np.random.default_rng(100 + r).standard_normal((N, 2 * d)).astype(np.float32))
             for r in range(ctx.world_size)]
    g_sum = grads[0].clone()
    for g in grads[1:]:
        g_sum = g_sum + g
    X0, V0 = ref.item_vectors()
    torch.cat([X0, V0], 1).backward(g_sum)
    dist.shard(net, ctx)
    st = net.sharded_tables
    X1, V1 = net.item_vectors()
    torch.cat([X1, V1], 1).backward(grads[rank])
    params = [st.in_ids, st.out_ids, st.in_feat, st.out_feat]
    feat_grads = ctx.all_reduce_sum(torch.cat([st.in_feat.grad, st.out_feat.grad]))
    lo, hi = st.lo, st.hi
    res = {
        "lookup_exact": bool(torch.equal(X0, X1) and torch.equal(V0, V1)),
        "id_grad_exact": bool(torch.equal(ref.emb_in.grad[lo:hi], st.in_ids.grad)
                              and torch.equal(ref.emb_out.grad[lo:hi], st.out_ids.grad)),
        "feat_grad_maxdiff": float((torch.cat([ref.emb_in.grad[N:], ref.emb_out.grad[N:]]) - feat_grads).abs().max()),
        "rows": [lo, hi],
    }
    st.in_feat.grad, st.out_feat.grad = feat_grads[:F].clone(), feat_grads[F:].clone()
    opt_ref = AdamW([{"params": [ref.emb_in, ref.emb_out], "base_lr": 0.01}], lr=0.01, weight_decay=0.01)
    opt = AdamW([{"params": params, "base_lr": 0.01}], lr=0.01, weight_decay=0.01)
    opt_ref.step()
    opt.step()
    res["update_exact"] = bool(torch.equal(ref.emb_in.detach()[lo:hi], st.in_ids.detach())
                               and torch.equal(ref.emb_out.detach()[lo:hi], st.out_ids.detach()))
    dist.unshard(net, ctx)
    res["unshard_exact"] = bool(torch.equal(net.emb_in[:N], ref.emb_in.detach()[:N]))
    with open(os.path.join(out, f"tables{rank}.json"), "w") as f:
        json.dump(res, f)


def _kill(out: str) -> None:
    import recmeta_sdk as rm
    from recmeta_sdk.training import distributed as dist
    from recmeta_sdk.training import loop

    rank = int(os.environ["RANK"])
    if rank == 1:
        real, calls = loop.make_batch, [0]

        def dying(*args, **kwargs):
            calls[0] += 1
            if calls[0] == 3:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*args, **kwargs)

        loop.make_batch = dying
    log, items = tiny_log(n_users=301)
    model = rm.train(log, items=items, config=dict(CONFIG, epochs=3),
                     distributed=dist.DistributedConfig(shard_tables=True, timeout_s=30))
    dist.save(model, os.path.join(out, "model.recmeta"))


def _nccl(out: str) -> None:
    """One NCCL rank (a GPU machine): ``rm.train`` through the distributed path, the
    collectives on the GPU, the item tables sharded (over one rank)."""
    import recmeta_sdk as rm
    from recmeta_sdk.training import distributed as dist

    log, items = tiny_log()
    model = rm.train(log, items=items, config=CONFIG,
                     distributed=dist.DistributedConfig(shard_tables=True, backend="nccl", timeout_s=60))
    ref = rm.train(log, items=items, config=CONFIG, distributed=False)
    a, b = model.recommend([0, 1, 2], k=5), ref.recommend([0, 1, 2], k=5)
    with open(os.path.join(out, "nccl.json"), "w") as f:
        json.dump({"backend": model.history["distributed"]["backend"], "same_ids": bool(np.array_equal(a.ids, b.ids)),
                   "max_score_diff": float(np.abs(a.scores - b.scores).max())}, f)


if __name__ == "__main__":
    mode, out_dir = sys.argv[1], sys.argv[2]
    {"train": _train, "kill": _kill, "nccl": _nccl}[mode](out_dir)
