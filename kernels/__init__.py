"""GPU kernels (Triton), shipped as ``recmeta_sdk.kernels``. Importing this package never
requires Triton or CUDA; each kernel module imports Triton itself."""
