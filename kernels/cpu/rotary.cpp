// Rotary position embedding for the CPU in one pass over the step's queries and keys: what
// transformers' Llama-family apply_rotary_pos_emb computes in about ten torch operators
// (slices, a concatenation, products and sums over the whole (tokens, heads, dim) tensors).
//
// For each token t and head, with h = D / 2 ("rotate half", not interleaved):
//   out[i]     = x[i]     * cos[t][i]     - x[i + h] * sin[t][i]
//   out[i + h] = x[i + h] * cos[t][i + h] + x[i]     * sin[t][i + h]
// each product and the sum rounded to the dtype as the torch operators round them (and no
// fused multiply-add, which would round once instead of twice).
//
// Layouts: x (tokens, heads, D) with strides x_token / x_head (elements, unit stride in D);
// cos, sin (tokens, D) contiguous; out (tokens, heads, D) contiguous.

#include <cstdint>

#include "microkernels.h"

// No fused multiply-add in this file: GCC reads the function attribute below, clang this pragma.
#pragma STDC FP_CONTRACT OFF

using namespace batchrun_cpu;  // NOLINT: one translation unit

namespace {

template <typename T>
__attribute__((optimize("fp-contract=off"))) void rotate(
    const T* x, const T* cos, const T* sin, T* out, int64_t tokens, int64_t heads, int64_t dim, int64_t x_token,
    int64_t x_head) {
  const int64_t half = dim / 2;
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < tokens; ++t) {
    const T* c = cos + t * dim;
    const T* s = sin + t * dim;
    for (int64_t h = 0; h < heads; ++h) {
      const T* xr = x + t * x_token + h * x_head;
      T* yr = out + (t * heads + h) * dim;
#pragma omp simd
      for (int64_t i = 0; i < half; ++i) {
        const float x1 = load(xr, i), x2 = load(xr, i + half);
        const float a = round_to<T>(x1 * load(c, i)), b = round_to<T>(-x2 * load(s, i));
        const float e = round_to<T>(x2 * load(c, i + half)), f = round_to<T>(x1 * load(s, i + half));
        store(yr, i, a + b);
        store(yr, i + half, e + f);
      }
    }
  }
}

}  // namespace

extern "C" int batchrun_rotary(
    const void* x, const void* cos, const void* sin, void* out, int64_t tokens, int64_t heads, int64_t dim,
    int64_t x_token, int64_t x_head, int32_t dtype) {
  if (dim % 2) return 2;
  switch (dtype) {
    case kF32:
      rotate(static_cast<const float*>(x), static_cast<const float*>(cos), static_cast<const float*>(sin),
             static_cast<float*>(out), tokens, heads, dim, x_token, x_head);
      return 0;
    case kBF16:
      rotate(static_cast<const uint16_t*>(x), static_cast<const uint16_t*>(cos), static_cast<const uint16_t*>(sin),
             static_cast<uint16_t*>(out), tokens, heads, dim, x_token, x_head);
      return 0;
    case kF16:
      rotate(static_cast<const _Float16*>(x), static_cast<const _Float16*>(cos), static_cast<const _Float16*>(sin),
             static_cast<_Float16*>(out), tokens, heads, dim, x_token, x_head);
      return 0;
    default: return 1;
  }
}
