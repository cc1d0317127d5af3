// Batch-1 sparse GEMV over a row-wise bitmask: y[r] = sum of values[offsets[r] + k] * x[column of the k-th set
// bit of row r]. Values are bf16, fp16 or fp32; products and sums are fp32.
//
// One source, three paths chosen at run time (the library itself is built for plain x86-64):
//   2: AVX-512 VBMI2: 32 columns a step, the row's next values expanded into place by vpexpandw;
//   1: AVX-512F: 16 columns a step with vexpandps (fp32 values) or 16-bit values widened first;
//   0: portable C++: set bits walked one by one.
// Rows are split over torch's intra-op threads.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cstring>

namespace {

enum Kind { BF16 = 0, F16 = 1, F32 = 2 };

inline float half_to_float(uint16_t h, Kind kind) {
  if (kind == BF16) {
    uint32_t u = uint32_t(h) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  return c10::detail::fp16_ieee_to_fp32_value(h);
}

// Up to 4 mask bytes starting at column c of a row of `cols` columns, as one little-endian word.
inline uint32_t mask_bits(const uint8_t* row, int64_t c, int64_t cols, int width) {
  int64_t left = cols - c;
  int bytes = int(((left < width ? left : width) + 7) / 8);
  uint32_t bits = 0;
  std::memcpy(&bits, row + c / 8, bytes);
  if (left < width) bits &= (left >= 32) ? 0xffffffffu : ((1u << left) - 1u);
  return bits;
}

void rows_portable(const uint8_t* mask, int64_t stride, const void* values, const int64_t* offsets, Kind kind,
                   const float* x, float* y, int64_t cols, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = mask + r * stride;
    int64_t k = offsets[r];
    float acc = 0.f;
    for (int64_t c = 0; c < cols; c += 8) {
      unsigned bits = row[c / 8];
      while (bits) {
        int j = __builtin_ctz(bits);
        float v = kind == F32 ? static_cast<const float*>(values)[k]
                              : half_to_float(static_cast<const uint16_t*>(values)[k], kind);
        acc += v * x[c + j];
        ++k;
        bits &= bits - 1;
      }
    }
    y[r] = acc;
  }
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi2")))
inline __m512 widen(__m256i h, Kind kind) {
  if (kind == BF16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  return _mm512_cvtph_ps(h);
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi2")))
void rows_vbmi2(const uint8_t* mask, int64_t stride, const void* values, const int64_t* offsets, Kind kind,
                const float* x, float* y, int64_t cols, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = mask + r * stride;
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    if (kind == F32) {
      const float* v = static_cast<const float*>(values) + offsets[r];
      for (int64_t c = 0; c < cols; c += 16) {
        __mmask16 bits = __mmask16(mask_bits(row, c, cols, 16));
        __m512 w = _mm512_maskz_expandloadu_ps(bits, v);
        __m512 xv = _mm512_maskz_loadu_ps(bits, x + c);
        acc0 = _mm512_fmadd_ps(w, xv, acc0);
        v += __builtin_popcount(bits);
      }
    } else {
      const uint16_t* v = static_cast<const uint16_t*>(values) + offsets[r];
      for (int64_t c = 0; c < cols; c += 32) {
        uint32_t bits = mask_bits(row, c, cols, 32);
        __m512i w = _mm512_maskz_expandloadu_epi16(__mmask32(bits), v);
        __m512 lo = widen(_mm512_castsi512_si256(w), kind);
        __m512 hi = widen(_mm512_extracti64x4_epi64(w, 1), kind);
        acc0 = _mm512_fmadd_ps(lo, _mm512_maskz_loadu_ps(__mmask16(bits), x + c), acc0);
        acc1 = _mm512_fmadd_ps(hi, _mm512_maskz_loadu_ps(__mmask16(bits >> 16), x + c + 16), acc1);
        v += __builtin_popcount(bits);
      }
    }
    y[r] = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
  }
}

__attribute__((target("avx512f,avx512bw,avx512vl")))
void rows_avx512f(const uint8_t* mask, int64_t stride, const void* values, const int64_t* offsets, Kind kind,
                  const float* x, float* y, int64_t cols, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = mask + r * stride;
    int64_t k = offsets[r];
    __m512 acc = _mm512_setzero_ps();
    for (int64_t c = 0; c < cols; c += 16) {
      __mmask16 bits = __mmask16(mask_bits(row, c, cols, 16));
      int kept = __builtin_popcount(bits);
      __m512 packed;
      if (kind == F32) {
        packed = _mm512_maskz_loadu_ps(__mmask16((1u << kept) - 1u), static_cast<const float*>(values) + k);
      } else {
        __m256i h = _mm256_maskz_loadu_epi16(__mmask16((1u << kept) - 1u), static_cast<const uint16_t*>(values) + k);
        packed = kind == BF16 ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))
                              : _mm512_cvtph_ps(h);
      }
      __m512 w = _mm512_maskz_expand_ps(bits, packed);
      acc = _mm512_fmadd_ps(w, _mm512_maskz_loadu_ps(bits, x + c), acc);
      k += kept;
    }
    y[r] = _mm512_reduce_add_ps(acc);
  }
}

int64_t best_isa() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl")) {
    return __builtin_cpu_supports("avx512vbmi2") ? 2 : 1;
  }
  return 0;
}

}  // namespace

// x: fp32 [cols]; mask: uint8 [rows, stride]; values: 1-D; offsets: int64 [rows + 1]. Returns fp32 [rows].
torch::Tensor bitmask_gemv(torch::Tensor x, torch::Tensor mask, torch::Tensor values, torch::Tensor offsets,
                           int64_t cols, int64_t isa) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.is_contiguous() && x.numel() == cols, "x: fp32 [cols]");
  TORCH_CHECK(mask.dtype() == torch::kUInt8 && mask.dim() == 2 && mask.is_contiguous() &&
              mask.size(1) * 8 >= cols, "mask: uint8 [rows, ceil(cols / 8)]");
  TORCH_CHECK(offsets.dtype() == torch::kInt64 && offsets.numel() == mask.size(0) + 1, "offsets: int64 [rows + 1]");
  TORCH_CHECK(values.dim() == 1 && values.is_contiguous(), "values: 1-D");
  Kind kind = values.dtype() == torch::kBFloat16 ? BF16 : values.dtype() == torch::kFloat16 ? F16 : F32;
  TORCH_CHECK(kind != F32 || values.dtype() == torch::kFloat32, "values: bf16, fp16 or fp32");
  int64_t rows = mask.size(0);
  auto y = torch::empty({rows}, x.options());
  const uint8_t* m = mask.data_ptr<uint8_t>();
  const void* v = values.data_ptr();
  const int64_t* off = offsets.data_ptr<int64_t>();
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  int64_t stride = mask.size(1);
  isa = std::min(isa, best_isa());
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    if (isa >= 2) rows_vbmi2(m, stride, v, off, kind, xp, yp, cols, r0, r1);
    else if (isa == 1) rows_avx512f(m, stride, v, off, kind, xp, yp, cols, r0, r1);
    else rows_portable(m, stride, v, off, kind, xp, yp, cols, r0, r1);
  });
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("bitmask_gemv", &bitmask_gemv, "batch-1 GEMV of a bitmask-packed weight");
  module.def("best_isa", &best_isa, "2: AVX-512 VBMI2, 1: AVX-512F/BW/VL, 0: portable");
}
