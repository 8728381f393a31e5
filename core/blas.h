// How many threads OpenBLAS may use (the one place that sets it), and the
// one check of a dimension passed to BLAS.
#pragma once

#include <cstdint>
#include <string>

namespace lora {

// A dimension as the int BLAS takes. Throws lora::error (exit 3) naming
// `tensor` (may be empty) when v is negative or above INT_MAX. Pure.
int blas_int(int64_t v, const std::string& tensor);

// threads <= 0: all cores. With 1, OpenBLAS's idle worker threads are also
// stopped: they otherwise spin (sched_yield) for about 0.1 s after the
// library loads, taking a core from our own thread pool, which runs one
// single-threaded BLAS call per worker (merge).
void set_blas_threads(int threads);

}  // namespace lora
