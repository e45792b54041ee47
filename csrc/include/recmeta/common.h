#pragma once
// Common definitions of the recmeta compiled core: dtypes, checks, views.
// No Python and no torch headers here or anywhere under csrc/.
#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>

namespace recmeta {

/// Storage formats of an embedding / item table.
enum class TableType : int32_t {
  F32 = 0,        ///< float32 rows
  F16 = 1,        ///< IEEE float16 rows (stored as uint16_t bits)
  I8Rowwise = 2,  ///< uint8 codes per element, value = code * row_scale[r] + row_min[r]
};

/// Integer type of ids, offsets and indices passed in by the caller.
enum class IndexType : int32_t { I32 = 0, I64 = 1 };

/// A read-only view of a 2-D row-major table (rows x dim) in one of the TableType formats.
/// `data` points at rows * row_stride elements of the storage type; for I8Rowwise,
/// `row_scale` and `row_min` point at `rows` float32 values each (nullptr otherwise).
struct TableView {
  TableType type = TableType::F32;
  const void* data = nullptr;
  int64_t rows = 0;
  int64_t dim = 0;
  int64_t row_stride = 0;  ///< elements between consecutive rows (>= dim)
  const float* row_scale = nullptr;
  const float* row_min = nullptr;
};

/// A read-only view of a 1-D integer array of either width.
struct IndexView {
  IndexType type = IndexType::I64;
  const void* data = nullptr;
  int64_t size = 0;
  inline int64_t operator[](int64_t i) const {
    return type == IndexType::I32 ? static_cast<const int32_t*>(data)[i]
                                  : static_cast<const int64_t*>(data)[i];
  }
};

/// Error raised by the core on invalid arguments. Bindings map it to Python's ValueError.
class InvalidArgument : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

namespace detail {
template <typename... Args>
[[noreturn]] inline void fail(const char* file, int line, Args&&... args) {
  std::ostringstream os;
  (os << ... << args);
  (void)file;
  (void)line;
  throw InvalidArgument(os.str());
}
}  // namespace detail

}  // namespace recmeta

/// RECMETA_CHECK(cond, msg...): throw recmeta::InvalidArgument with the streamed message
/// when cond is false. Real code, never compiled out.
#define RECMETA_CHECK(cond, ...)                                   \
  do {                                                             \
    if (!(cond)) ::recmeta::detail::fail(__FILE__, __LINE__, __VA_ARGS__); \
  } while (0)
