// RMSNorm in one pass over each row, for the CPU: what transformers' Llama-family RMSNorm
// computes in four torch operators (to float32, pow + mean, rsqrt and multiply, cast back,
// multiply by the weight), each a full pass over the activations.
//
//   y   = x * rsqrt(mean(x^2) + eps)        in float32
//   out = weight * y                        y rounded to the input dtype first, and the
//                                           product rounded again, exactly as the torch
//                                           operators round (bf16 / fp16 ops compute in
//                                           float32 and round once)
//
// Layouts: x and out (rows, hidden), row stride x_stride / hidden; weight (hidden,).

#include <cmath>
#include <cstdint>

#include "microkernels.h"

using namespace batchrun_cpu;  // NOLINT: one translation unit

namespace {

template <typename T>
void rms_norm(const T* x, const T* weight, T* out, int64_t rows, int64_t hidden, int64_t x_stride, float eps) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * x_stride;
    T* yr = out + r * hidden;
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t d = 0; d < hidden; ++d) {
      const float v = load(xr, d);
      sum += v * v;
    }
    const float inv = 1.f / std::sqrt(sum / float(hidden) + eps);
#pragma omp simd
    for (int64_t d = 0; d < hidden; ++d)  // y rounded to T, as .to(input_dtype) does
      store(yr, d, load(weight, d) * round_to<T>(load(xr, d) * inv));
  }
}

}  // namespace

extern "C" int batchrun_rms_norm(
    const void* x, const void* weight, void* out, int64_t rows, int64_t hidden, int64_t x_stride, float eps,
    int32_t dtype) {
  switch (dtype) {
    case kF32: rms_norm(static_cast<const float*>(x), static_cast<const float*>(weight), static_cast<float*>(out), rows, hidden, x_stride, eps); return 0;
    case kBF16: rms_norm(static_cast<const uint16_t*>(x), static_cast<const uint16_t*>(weight), static_cast<uint16_t*>(out), rows, hidden, x_stride, eps); return 0;
    case kF16: rms_norm(static_cast<const _Float16*>(x), static_cast<const _Float16*>(weight), static_cast<_Float16*>(out), rows, hidden, x_stride, eps); return 0;
    default: return 1;
  }
}
