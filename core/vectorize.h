// LORA_VECTORIZE: compiles a hot loop three times (AVX-512, AVX2 + FMA, and
// the x86-64 baseline the rest of the build targets); the loader picks the
// best one the CPU has (GCC function multi-versioning). The loop itself stays
// plain C++ that the compiler vectorizes: the results are the same bits on
// every path, only the speed differs.
#pragma once

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(LORA_NO_MULTIVERSION)
#define LORA_VECTORIZE __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define LORA_VECTORIZE
#endif
