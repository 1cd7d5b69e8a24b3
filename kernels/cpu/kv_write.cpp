// The step's new keys and values stored at their cache slots on the CPU: token t's key and
// value rows (heads x row_bytes, each head's row contiguous, heads and tokens strided) are
// copied to slot slots[t] of k_cache and v_cache ((slots, heads, row) contiguous).
//
// This is torch's index_copy_ along the slot dim, written as plain row copies: a step's slots
// are scattered over the whole pool, so nearly every destination misses the caches and the
// TLB, and index_copy_'s element loop keeps few of those misses in flight (256 decode rows of
// a 577 MiB pool: 148 us with index_copy_, 38 us as row copies; measured on this project's
// CPU machine). Element type does not matter: the caller has cast the rows to the cache's.

#include <cstdint>
#include <cstring>

namespace {

constexpr int64_t kParallelMinTokens = 512;  // below it, a second thread costs more than it saves

void copy_rows(const char* src, int64_t stride_t, int64_t stride_h, char* cache, const int64_t* slots,
               int64_t tokens, int64_t heads, int64_t row_bytes) {
  const int64_t slot_bytes = heads * row_bytes;
#pragma omp parallel for schedule(static) if (tokens >= kParallelMinTokens)
  for (int64_t t = 0; t < tokens; ++t) {
    char* dst = cache + slots[t] * slot_bytes;
    for (int64_t h = 0; h < heads; ++h) std::memcpy(dst + h * row_bytes, src + t * stride_t + h * stride_h, row_bytes);
  }
}

}  // namespace

// Strides are in bytes. Returns 0, or 1 (and writes nothing) where a slot is outside the
// cache's num_slots.
extern "C" int batchrun_write_kv(const char* key, int64_t key_stride_t, int64_t key_stride_h, const char* value,
                                 int64_t value_stride_t, int64_t value_stride_h, char* k_cache, char* v_cache,
                                 const int64_t* slots, int64_t num_slots, int64_t tokens, int64_t heads,
                                 int64_t row_bytes) {
  for (int64_t t = 0; t < tokens; ++t)
    if (slots[t] < 0 || slots[t] >= num_slots) return 1;
  copy_rows(key, key_stride_t, key_stride_h, k_cache, slots, tokens, heads, row_bytes);
  copy_rows(value, value_stride_t, value_stride_h, v_cache, slots, tokens, heads, row_bytes);
  return 0;
}
