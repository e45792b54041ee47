#pragma once
// Shared declarations of the pybind11 adaptor (module recmeta_sdk._core).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

namespace recmeta_bindings {
void bind_embedding_bag(pybind11::module_& m);
void bind_policy_topk(pybind11::module_& m);
}  // namespace recmeta_bindings
