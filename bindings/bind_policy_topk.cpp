// Binding of the policy_topk op (owned by the policy_topk core work).
#include "bindings.h"

namespace recmeta_bindings {
void bind_policy_topk(pybind11::module_& m) { (void)m; }
}  // namespace recmeta_bindings
