// Binding of the embedding_bag op (owned by the embedding_bag core work).
#include "bindings.h"

namespace recmeta_bindings {
void bind_embedding_bag(pybind11::module_& m) { (void)m; }
}  // namespace recmeta_bindings
