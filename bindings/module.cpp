// recmeta_sdk._core: the pybind11 adaptor over the compiled core. Each op binds itself in
// bind_<op>.cpp; this file holds the module, error translation and build facts.
#include <pybind11/stl.h>

#include "bindings.h"
#include "recmeta/common.h"
#include "recmeta/cpu_features.h"

namespace py = pybind11;

PYBIND11_MODULE(_core, m) {
  m.doc() = "recmeta compiled core: fused embedding bags and fused policy scoring (CPU)";
#ifdef RECMETA_VERSION
  m.attr("__version__") = RECMETA_VERSION;
#endif
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const recmeta::InvalidArgument& e) {
      PyErr_SetString(PyExc_ValueError, e.what());
    }
  });

  m.def("cpu_isa", []() { return std::string(recmeta::cpu::isa_name(recmeta::cpu::active_isa())); },
        "The CPU kernel variant in use: 'generic', 'avx2' or 'avx512'.");
  m.def("cpu_best_isa", []() { return std::string(recmeta::cpu::isa_name(recmeta::cpu::best_isa())); },
        "The best CPU kernel variant built in and supported by this CPU (ignoring RECMETA_CPU_ISA).");
  m.def("has_openmp", &recmeta::cpu::has_openmp, "Whether the core was built with OpenMP.");
  m.def("get_num_threads", &recmeta::cpu::max_threads, "Threads the core's parallel loops use.");
  m.def("set_num_threads", [](int n) {
          if (n < 1) throw py::value_error("set_num_threads: n must be >= 1, got " + std::to_string(n));
          recmeta::cpu::set_threads(n);
        },
        py::arg("n"), "Set the number of threads of the core's parallel loops (OpenMP).");

  recmeta_bindings::bind_embedding_bag(m);
  recmeta_bindings::bind_policy_topk(m);
}
