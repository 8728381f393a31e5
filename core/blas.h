// How many threads OpenBLAS may use: the one place that sets it.
#pragma once

namespace lora {

// threads <= 0: all cores. With 1, OpenBLAS's idle worker threads are also
// stopped: they otherwise spin (sched_yield) for about 0.1 s after the
// library loads, taking a core from our own thread pool, which runs one
// single-threaded BLAS call per worker (merge).
void set_blas_threads(int threads);

}  // namespace lora
