#include "core/blas.h"

#include <cblas.h>

#include <climits>

#include <fmt/format.h>

#include "core/thread-pool.h"
#include "formats/error.h"

// Exported by OpenBLAS's threaded builds (it stops the worker threads; a
// later multi-threaded call starts them again). Weak: absent from the serial
// build, where there is nothing to stop.
extern "C" int blas_thread_shutdown_(void) __attribute__((weak));

namespace lora {

void set_blas_threads(int threads) {
  const int n = resolve_threads(threads);
  openblas_set_num_threads(n);
  if (n == 1 && blas_thread_shutdown_ != nullptr) blas_thread_shutdown_();
}

int blas_int(int64_t v, const std::string& tensor) {
  if (v > INT_MAX || v < 0) throw errors::invalid("", tensor, fmt::format("dimension {} is too large for BLAS", v));
  return static_cast<int>(v);
}

}  // namespace lora
