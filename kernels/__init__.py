"""The Triton GPU kernels behind recmeta's ops on CUDA tensors (``recmeta_sdk.kernels``).

Importing this package never requires Triton or CUDA; each kernel module imports Triton
itself.

* ``embedding_bag``: table-batched embedding bag forward; backward fused with SGD /
  row-wise Adagrad (deterministic and atomic variants).
* ``policy_topk``: fused two-stage policy top-k and Gumbel-top-k sampling.
* ``_heuristics``: launch configurations (pure Python).
* ``_common``: torch-only pieces shared with the CUDA path (stage-2 merge, key packing,
  mask keys, backward plan, seed key of the Gumbel hash).

Load them through :func:`recmeta_sdk.ops._native.load_kernel_module` (re-exported by
:mod:`recmeta_sdk.ops._gpu`), which also works from the source tree (where this folder is
``<root>/kernels``).
"""
