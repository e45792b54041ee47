"""The data layer: ingest, cleaning, id maps, side features, splits, tasks and batches.

Interaction logs are tables with the columns ``user`` and ``item`` and, optionally,
``timestamp``, ``reward``, ``propensity``, ``position`` and any context columns. They may
be given as a pandas DataFrame, a pyarrow Table, a dict of 1-D arrays, or a CSV / Parquet
path or a folder of Parquet files (:func:`read_interactions`). :func:`scan_parquet` streams
a Parquet file or folder by record batches into compact arrays (dense ids, float32 rewards)
without a DataFrame of the whole log, optionally one rank's share of it.

Typical flow::

    from recmeta_sdk import data, datasets

    ds = datasets.load("ml-100k")
    log, report = data.clean(ds.interactions, reward_range=(1, 5))
    print(report)
    parts = data.split(log, "cold_users", fold=0, k=10)
    enc = data.encode(parts.train)                 # dense ids + IdMap in both directions
    seqs = data.build_sequences(enc.item_ids, enc.user_ids, enc.timestamps, L=50)
    hist = seqs.padded(rows=range(256))            # (256, 50) most recent items, -1 padded
    tasks = data.make_tasks(parts.train, by="user", support_size=10)
    genres = data.FeatureEncoder(multi_valued=["genres"], numeric=["release_year"],
                                 numeric_mode="bucketize").fit(ds.items)
    bags = genres.transform(ds.items, index=enc.item_map)   # CSR token bags per dense item id
    enc.user_map.to_index(["new-user"])                      # array([-1]): the cold-start path

Only numpy, pandas and pyarrow are imported; nothing here needs the compiled core.
"""
from __future__ import annotations

from ._batches import (
    Sequences,
    build_sequences,
    full_catalogue_targets,
    sample_negatives,
    user_histories,
    user_item_csr,
)
from ._clean import RULES, CleaningReport, clean
from ._features import EncodedFeatures, FeatureEncoder
from ._ingest import (
    OPTIONAL_COLUMNS,
    REQUIRED_COLUMNS,
    UNKNOWN,
    EncodedInteractions,
    IdMap,
    encode,
    is_parquet_source,
    read_interactions,
    timestamp_array,
)
from ._split import SPLITS, ColdSplit, Split, split
from ._stream import (
    BATCH_ROWS,
    LogArrays,
    ParquetParts,
    parquet_parts,
    scan_parquet,
)
from ._tasks import TASK_KINDS, Task, TaskSet, make_tasks

__all__ = [
    "BATCH_ROWS",
    "OPTIONAL_COLUMNS",
    "REQUIRED_COLUMNS",
    "RULES",
    "SPLITS",
    "TASK_KINDS",
    "UNKNOWN",
    "CleaningReport",
    "ColdSplit",
    "EncodedFeatures",
    "EncodedInteractions",
    "FeatureEncoder",
    "IdMap",
    "LogArrays",
    "ParquetParts",
    "Sequences",
    "Split",
    "Task",
    "TaskSet",
    "build_sequences",
    "clean",
    "encode",
    "full_catalogue_targets",
    "is_parquet_source",
    "make_tasks",
    "parquet_parts",
    "read_interactions",
    "sample_negatives",
    "scan_parquet",
    "split",
    "timestamp_array",
    "user_histories",
    "user_item_csr",
]
