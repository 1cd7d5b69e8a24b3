// The gated MLP's activation for the CPU in one pass: out = silu(gate) * up, what
// transformers' Llama-family MLP computes in two torch operators (F.silu, then a product),
// each a full pass over the step's (tokens, intermediate) activations.
//
//   silu(g) = g / (1 + e^-g)      in float32, rounded to the dtype (as F.silu's output is)
//   out     = silu(g) * up        in float32, rounded to the dtype (as the product is)
//
// e^-g is the vector exp of microkernels.h (relative error ~1e-7, where torch's is SLEEF's):
// results can differ from torch's in the last bit of float32, and in bf16 only where that
// bit decides the rounding.
//
// Layouts: gate and up (rows, width) with row strides gate_stride / up_stride (elements, unit
// stride along width: both may be halves of one fused gate_up projection); out (rows, width)
// contiguous.

#include <cstdint>

#include "microkernels.h"

using namespace batchrun_cpu;  // NOLINT: one translation unit

namespace {

constexpr float kMaxExp2 = 126.f;  // for g < -87, silu(g) is within 1e-36 of 0 either way

inline v16 silu(v16 g) {
  v16 t = g * -kLog2e;
  t = t > kMaxExp2 ? v16{} + kMaxExp2 : t;
  return g / (1.f + vexp2(t));
}

template <typename T>
void silu_mul(const T* gate, const T* up, T* out, int64_t rows, int64_t width, int64_t gate_stride,
              int64_t up_stride) {
  const int64_t vector_end = std::is_same_v<T, _Float16> ? 0 : width / 16 * 16;
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const T* g = gate + r * gate_stride;
    const T* u = up + r * up_stride;
    T* o = out + r * width;
    if constexpr (!std::is_same_v<T, _Float16>) {
      for (int64_t i = 0; i < vector_end; i += 16) {
        const v16 s = round16<T>(silu(load16(g + i)));
        store16(o + i, s * load16(u + i));
      }
    }
    for (int64_t i = vector_end; i < width; ++i) {  // the tail (and fp16, lane by lane)
      const float s = round_to<T>(silu(v16{} + load(g, i))[0]);
      store(o, i, s * load(u, i));
    }
  }
}

}  // namespace

extern "C" int batchrun_silu_mul(
    const void* gate, const void* up, void* out, int64_t rows, int64_t width, int64_t gate_stride,
    int64_t up_stride, int32_t dtype) {
  switch (dtype) {
    case kF32:
      silu_mul(static_cast<const float*>(gate), static_cast<const float*>(up), static_cast<float*>(out), rows,
               width, gate_stride, up_stride);
      return 0;
    case kBF16:
      silu_mul(static_cast<const uint16_t*>(gate), static_cast<const uint16_t*>(up), static_cast<uint16_t*>(out),
               rows, width, gate_stride, up_stride);
      return 0;
    case kF16:
      silu_mul(static_cast<const _Float16*>(gate), static_cast<const _Float16*>(up), static_cast<_Float16*>(out),
               rows, width, gate_stride, up_stride);
      return 0;
    default: return 1;
  }
}
