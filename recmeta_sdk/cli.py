"""Command line: ``recmeta <command>`` or ``python -m recmeta_sdk <command>``.

Commands
--------
env        what is installed and which backends are available, and why
train      train a model on a dataset or a CSV / Parquet log and save it (under
           ``torchrun --nproc_per_node=N -m recmeta_sdk train ...``: on N processes, see
           :mod:`recmeta_sdk.training.distributed`; rank 0 writes the file)
evaluate   ranking metrics of a saved model on a test log
recommend  top-k for a known user or for a new user's history
demo       the MovieLens-100K demo (meta-training, warm and cold-start tables vs peers)
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
from typing import List, Optional


def _cmd_env(args) -> int:
    import numpy
    import torch

    from . import __version__
    from .ops import backends

    print(f"recmeta {__version__}")
    print(f"python {platform.python_version()} on {platform.machine()} {platform.system()}")
    print(f"numpy {numpy.__version__}, torch {torch.__version__}")
    try:
        from .ops._native import core

        _core = core()
        print(f"compiled core: CPU kernel variant '{_core.cpu_isa()}' "
              f"(best on this CPU: '{_core.cpu_best_isa()}'), OpenMP "
              f"{'on' if _core.has_openmp() else 'off'}, {_core.get_num_threads()} threads")
    except ImportError as e:
        print(f"compiled core: not available ({e})")
    print("backends:")
    for name, (ok, why) in backends.describe().items():
        print(f"  {name:7s} {'yes' if ok else 'no ':3s}  {why}")
    print(f"default CPU backend: {backends.resolve(None, 'cpu')}")
    print("backend table (op, device, dtypes: backends in order of preference; * the default here, "
          "-> what runs; ops.backends.table()):")
    for line in backends.format_table().splitlines():
        print(f"  {line}")
    return 0


def _read_log(spec: str):
    """A dataset name known to recmeta_sdk.datasets, or a CSV / Parquet path (a Parquet file or
    folder is passed on as its path: ``train`` streams it, each rank its share under torchrun)."""
    from . import data, datasets

    if spec in datasets.DATASETS:
        ds = datasets.load(spec)
        return ds.interactions, ds.users, ds.items
    if data.is_parquet_source(spec):
        return spec, None, None
    return data.read_interactions(spec), None, None


def _config(args) -> dict:
    cfg = json.loads(args.config) if args.config else {}
    if not isinstance(cfg, dict):
        raise ValueError("--config must be a JSON object")
    if getattr(args, "epochs", None) is not None:
        cfg["epochs"] = args.epochs
    return cfg


def _cmd_train(args) -> int:
    from .api import train

    from .training import distributed

    opts = distributed.DistributedConfig(
        table_budget_bytes=(int(args.table_budget_mb * 2**20) if args.table_budget_mb is not None
                            else distributed.DistributedConfig.table_budget_bytes),
        shard_tables=args.shard_tables, timeout_s=args.timeout)
    ctx = distributed.resolve("auto", options=opts)  # under torchrun: sets up the process group
    log, users, items = _read_log(args.data)
    model = train(log, users=users, items=items, config=_config(args),
                  distributed=opts if ctx is not None else False)
    distributed.save(model, args.out)
    if ctx is None or ctx.rank == 0:
        where = f" (trained on {ctx.world_size} processes)" if ctx is not None else ""
        print(f"saved {model!r} to {args.out}{where}")
    return 0


def _cmd_evaluate(args) -> int:
    from . import data
    from .api import load

    model = load(args.model)
    test = data.read_interactions(args.test)
    exclude = data.read_interactions(args.exclude) if args.exclude else None
    for key, val in model.evaluate(test, k=args.k, exclude=exclude).items():
        print(f"{key:>14s} {val:.4f}")
    return 0


def _parse_id(x: str, model):
    import numpy as np

    return int(x) if np.issubdtype(model.item_ids.dtype, np.integer) else x


def _cmd_recommend(args) -> int:
    from .api import load

    model = load(args.model)
    if (args.user is None) == (args.history is None):
        raise ValueError("give exactly one of --user ID or --history ID,ID,...")
    if args.user is not None:
        import numpy as np

        uid = int(args.user) if np.issubdtype(model.user_ids.dtype, np.integer) else args.user
        target = uid
    else:
        items = [_parse_id(x.strip(), model) for x in args.history.split(",") if x.strip()]
        target = model.adapt(items, unknown="drop")
        if target.dropped:
            print(f"dropped unknown items: {list(target.dropped)}", file=sys.stderr)
    recs = model.recommend(target, k=args.k, explain=args.explain)
    for j, (item, score, ok) in enumerate(zip(recs.ids, recs.scores, recs.valid)):
        if not ok:
            break
        line = f"{j + 1:3d}. {item}  score {score:.3f}"
        if args.explain:
            e = recs.explanations[j]
            line += "  because " + ", ".join(f"{h} ({c:+.2f})" for h, c in e["history"]) + \
                    "; " + ", ".join(f"{n} ({c:+.2f})" for n, c in e["features"])
        print(line)
    return 0


def _cmd_demo(args) -> int:
    from .demo import run

    import torch

    if args.verbose:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    run(folds=args.folds, epochs=args.epochs)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="recmeta", description="recmeta recommender SDK")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("env", help="show the installation and the available backends")
    p.set_defaults(func=_cmd_env)
    p = sub.add_parser("train", help="train a model and save it")
    p.add_argument("--data", required=True, help="dataset name (e.g. ml-100k) or a CSV / Parquet log")
    p.add_argument("--out", required=True, help="model file to write")
    p.add_argument("--config", help="JSON object of config overrides")
    p.add_argument("--epochs", type=int)
    p.add_argument("--table-budget-mb", type=float,
                   help="distributed: per-rank budget of the item tables in MiB (default 1024); above it they are sharded")
    p.add_argument("--shard-tables", action=argparse.BooleanOptionalAction, default=None,
                   help="distributed: always (--shard-tables) or never (--no-shard-tables) shard the item tables")
    p.add_argument("--timeout", type=float, default=300.0,
                   help="distributed: seconds a collective waits for the other ranks (default 300)")
    p.set_defaults(func=_cmd_train)
    p = sub.add_parser("evaluate", help="ranking metrics of a saved model on a test log")
    p.add_argument("model")
    p.add_argument("test", help="CSV / Parquet log of test interactions (known users)")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--exclude", help="log of further interactions to exclude from ranking")
    p.set_defaults(func=_cmd_evaluate)
    p = sub.add_parser("recommend", help="top-k for a known user or a new user's history")
    p.add_argument("model")
    p.add_argument("--user")
    p.add_argument("--history", help="comma-separated item ids of a new user, oldest first")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--explain", action="store_true")
    p.set_defaults(func=_cmd_recommend)
    p = sub.add_parser("demo", help="MovieLens-100K: meta-train, compare with popularity and EASE")
    p.add_argument("--folds", type=int, default=1, help="cold-start folds to run (5 = the full protocol)")
    p.add_argument("--epochs", type=int, help="override the training epochs")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: the demo's small models gain little from more, "
                        "and one thread is robust on a shared machine)")
    p.add_argument("-v", "--verbose", action="store_true", help="log training progress")
    p.set_defaults(func=_cmd_demo)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"recmeta {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
