"""The public ops of recmeta (embedding bags, policy scoring, quantisation), numpy or torch.

* :func:`embedding_bag` / :func:`embedding_bag_backward`: fused (table-batched) embedding
  bags, forward and backward with a fused sparse optimiser (SGD or row-wise Adagrad, a state
  per table), over one table, a list of tables, or one table holding several tables' rows
  with per-table row offsets (``table_offsets=``, FBGEMM's ``hash_size_cumsum``).
* :func:`policy_topk` / :func:`policy_sample`: fused policy scoring with top-k or
  Gumbel-top-k sampling, with the softmax log-normaliser and propensities.
* :func:`quantize`: float16 / row-wise int8 tables for all of the above.

Each accepts numpy arrays or torch tensors and returns the same kind it was given; a
``backend=`` argument (or ``RECMETA_BACKEND``) chooses the implementation
(see :mod:`recmeta_sdk.ops.backends`).
"""
from ._embedding_bag import embedding_bag, embedding_bag_backward
from ._policy_topk import policy_sample, policy_topk
from ._common import quantize
from .reference import QuantizedTable

__all__ = [
    "embedding_bag",
    "embedding_bag_backward",
    "policy_topk",
    "policy_sample",
    "quantize",
    "QuantizedTable",
]
