// Batch-1 GEMVs for decoding, one token at a time (memory-bound: every weight byte is read once a token).
//   bitmask: y[r] = sum of values[offsets[r] + k] * x[column of the k-th set bit of row r];
//   dense:   y[r] = sum of w[r, c] * x[c], for a bf16 weight that is not pruned (an LM head).
// Values are bf16, fp16 or fp32; x is widened to fp32 once a call; products and sums are fp32.
//
// One source, four paths chosen at run time (the library itself is built for plain x86-64):
//   3: AVX-512 BF16 + VBMI2, bf16 values and bf16 x (a bf16 model's activations): as 2, but each step's 32
//      products summed in pairs by vdpbf16ps against x as it is (bf16 x bf16 products are exact in fp32;
//      only the order of the fp32 sums differs, as between all paths), half the FP work of widening;
//   2: AVX-512 VBMI2: 32 columns a step, the step's values loaded (masked to their count) and put in place
//      by the register form of vpexpandw (the memory form is microcoded and several times slower on Zen 4);
//      bf16 is widened in-lane by interleaving with zeros, so x is stored once a call in the matching order;
//   1: AVX-512F: 16 columns a step with vexpandps (fp32 values) or 16-bit values widened first;
//   0: portable C++: set bits walked one by one.
// Paths 3 and 2 on bf16 values, and the dense bf16 GEMV, take four rows through each step (in_runs).
// Rows are split over torch's intra-op threads. The sum order differs between paths (fp32 rounding,
// about 1e-6 of the sum of |terms|); the result is then rounded once to x's dtype, with the bias added in fp32.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cstring>
#include <vector>

namespace {

enum Kind { BF16 = 0, F16 = 1, F32 = 2 };

Kind kind_of(const torch::Tensor& t) {
  auto d = t.scalar_type();
  TORCH_CHECK(d == torch::kBFloat16 || d == torch::kFloat16 || d == torch::kFloat32, "bf16, fp16 or fp32 expected");
  return d == torch::kBFloat16 ? BF16 : d == torch::kFloat16 ? F16 : F32;
}

inline float half_to_float(uint16_t h, Kind kind) {
  if (kind == BF16) {
    uint32_t u = uint32_t(h) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  return c10::detail::fp16_ieee_to_fp32_value(h);
}

inline float element(const void* data, int64_t i, Kind kind) {
  return kind == F32 ? static_cast<const float*>(data)[i] : half_to_float(static_cast<const uint16_t*>(data)[i], kind);
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

// Where column c of x goes for the in-lane bf16 widening: in each block of 32 columns, the 128-bit lane L of
// a 32-word vector holds columns 8L..8L+7; interleaving with zeros gives columns 8L..8L+3 (low half) and
// 8L+4..8L+7 (high half) as fp32 in lane L. Returns the fp32 index in the stored x.
inline int64_t lane_order(int64_t c) {
  int64_t block = c / 32, i = c % 32, lane = i / 8, j = i % 8;
  return block * 32 + (j < 4 ? lane * 4 + j : 16 + lane * 4 + (j - 4));
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
        acc += element(values, k, kind) * x[c + j];
        ++k;
        bits &= bits - 1;
      }
    }
    y[r] = acc;
  }
}

#define VBMI2 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi2,bmi2,popcnt")))

// One 32-column step of a bf16 bitmask row: the step's n values (masked load, so never past the end) expanded
// to their columns and widened in lane order; x (lane order) read unmasked: a pruned weight is a zero, as in
// the dense product.
VBMI2 inline void step_bf16(uint32_t bits, const uint16_t*& v, const float* xs, __m512& lo, __m512& hi) {
  int n = _mm_popcnt_u32(bits);
  __m512i w = _mm512_maskz_expand_epi16(bits, _mm512_maskz_loadu_epi16(_bzhi_u32(0xffffffffu, n), v));
  v += n;
  const __m512i zero = _mm512_setzero_si512();
  lo = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_unpacklo_epi16(zero, w)), _mm512_loadu_ps(xs), lo);
  hi = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_unpackhi_epi16(zero, w)), _mm512_loadu_ps(xs + 16), hi);
}

// Rows r0..r1 as GROUP_ROWS runs of `run` consecutive rows, a group taking one row of each run (group(r, run)
// for rows r, r + run, ...), then the rows left over one by one (single(r)): each run's mask and values are
// read front to back, so a group reads GROUP_ROWS long sequential streams that the hardware prefetcher
// follows. (Groups of adjacent rows read four interleaved positions of one region instead, and measured
// slower than one row at a time from DRAM: bench/RESULTS.md, issue #31.)
constexpr int GROUP_ROWS = 4;

template <class Group, class Single>
inline void in_runs(int64_t r0, int64_t r1, Group group, Single single) {
  const int64_t run = (r1 - r0) / GROUP_ROWS;
  for (int64_t r = r0; r < r0 + run; ++r) group(r, run);
  for (int64_t r = r0 + GROUP_ROWS * run; r < r1; ++r) single(r);
}

// R bf16 bitmask rows r, r + gap, ...; x in lane order, zero-padded to whole 32-column blocks, loaded once a
// step for all R rows; four sums a row (two steps at a time). A row's summation order does not depend on R.
template <int R>
VBMI2 inline void rows_vbmi2_bf16_group(const uint8_t* mask, int64_t stride, const uint16_t* values,
                                        const int64_t* offsets, const float* x, float* y, int64_t cols, int64_t r,
                                        int64_t gap) {
  const int64_t steps = cols / 32;
  const uint8_t* row[R];
  const uint16_t* v[R];
  __m512 a[4][R];
  for (int i = 0; i < R; ++i) {
    row[i] = mask + (r + i * gap) * stride;
    v[i] = values + offsets[r + i * gap];
    a[0][i] = a[1][i] = a[2][i] = a[3][i] = _mm512_setzero_ps();
  }
  int64_t s = 0;
  for (; s + 2 <= steps; s += 2) {  // two steps, four independent sums a row
    for (int i = 0; i < R; ++i) {
      uint64_t bits;
      std::memcpy(&bits, row[i] + s * 4, 8);
      step_bf16(uint32_t(bits), v[i], x + s * 32, a[0][i], a[1][i]);
      step_bf16(uint32_t(bits >> 32), v[i], x + s * 32 + 32, a[2][i], a[3][i]);
    }
  }
  for (; s < steps; ++s)
    for (int i = 0; i < R; ++i) step_bf16(mask_bits(row[i], s * 32, cols, 32), v[i], x + s * 32, a[0][i], a[1][i]);
  if (cols % 32)
    for (int i = 0; i < R; ++i)
      step_bf16(mask_bits(row[i], steps * 32, cols, 32), v[i], x + steps * 32, a[2][i], a[3][i]);
  for (int i = 0; i < R; ++i)
    y[r + i * gap] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a[0][i], a[1][i]), _mm512_add_ps(a[2][i], a[3][i])));
}

VBMI2 void rows_vbmi2_bf16(const uint8_t* mask, int64_t stride, const uint16_t* values, const int64_t* offsets,
                           const float* x, float* y, int64_t cols, int64_t r0, int64_t r1) {
  in_runs(r0, r1,
          [&](int64_t r, int64_t run) { rows_vbmi2_bf16_group<GROUP_ROWS>(mask, stride, values, offsets, x, y, cols, r, run); },
          [&](int64_t r) { rows_vbmi2_bf16_group<1>(mask, stride, values, offsets, x, y, cols, r, 0); });
}

#define BF16DOT __attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi2,avx512bf16,bmi2,popcnt")))

BF16DOT inline __m512 step_dot(uint32_t bits, const uint16_t*& v, __m512bh xs, __m512 acc) {
  int n = _mm_popcnt_u32(bits);
  __m512i w = _mm512_maskz_expand_epi16(bits, _mm512_maskz_loadu_epi16(_bzhi_u32(0xffffffffu, n), v));
  v += n;
  return _mm512_dpbf16_ps(acc, (__m512bh)w, xs);
}

BF16DOT inline __m512bh x_at(const uint16_t* x, int64_t s) { return (__m512bh)_mm512_loadu_si512(x + s * 32); }

// R bf16 bitmask rows r, r + gap, ..., r + (R - 1) gap, against bf16 x (column order, zero-padded to whole
// 32-column blocks). The R rows go through each step together: x is loaded once for all of them, and their
// 2R sums are independent chains, so a step no longer waits on one row's previous vdpbf16ps (a row alone is
// bound by that latency and by its step count, whatever the step's count: bench/RESULTS.md, issue #31).
// Each row's own summation order is the same for every R: a row's result does not depend on its group.
template <int R>
BF16DOT inline void rows_dot_bf16_group(const uint8_t* mask, int64_t stride, const uint16_t* values,
                                        const int64_t* offsets, const uint16_t* x, float* y, int64_t cols,
                                        int64_t r, int64_t gap) {
  const int64_t steps = cols / 32;
  const uint8_t* row[R];
  const uint16_t* v[R];
  __m512 a0[R], a1[R];
  for (int i = 0; i < R; ++i) {
    row[i] = mask + (r + i * gap) * stride;
    v[i] = values + offsets[r + i * gap];
    a0[i] = a1[i] = _mm512_setzero_ps();
  }
  int64_t s = 0;
  for (; s + 2 <= steps; s += 2) {  // two steps a row, two sums a row
    __m512bh x0 = x_at(x, s), x1 = x_at(x, s + 1);
    for (int i = 0; i < R; ++i) {
      uint64_t bits;
      std::memcpy(&bits, row[i] + s * 4, 8);
      a0[i] = step_dot(uint32_t(bits), v[i], x0, a0[i]);
      a1[i] = step_dot(uint32_t(bits >> 32), v[i], x1, a1[i]);
    }
  }
  for (; s < steps; ++s)
    for (int i = 0; i < R; ++i) a0[i] = step_dot(mask_bits(row[i], s * 32, cols, 32), v[i], x_at(x, s), a0[i]);
  if (cols % 32)
    for (int i = 0; i < R; ++i) a1[i] = step_dot(mask_bits(row[i], steps * 32, cols, 32), v[i], x_at(x, steps), a1[i]);
  for (int i = 0; i < R; ++i) y[r + i * gap] = _mm512_reduce_add_ps(_mm512_add_ps(a0[i], a1[i]));
}

BF16DOT void rows_dot_bf16(const uint8_t* mask, int64_t stride, const uint16_t* values, const int64_t* offsets,
                           const uint16_t* x, float* y, int64_t cols, int64_t r0, int64_t r1) {
  in_runs(r0, r1,
          [&](int64_t r, int64_t run) { rows_dot_bf16_group<GROUP_ROWS>(mask, stride, values, offsets, x, y, cols, r, run); },
          [&](int64_t r) { rows_dot_bf16_group<1>(mask, stride, values, offsets, x, y, cols, r, 0); });
}

// R dense bf16 rows r, r + gap, ... against bf16 x (padded as above), x loaded once a step for all of them,
// two sums a row (alternate steps), so that no sum waits on its own previous vdpbf16ps.
template <int R>
BF16DOT inline void rows_dense_dot_group(const uint16_t* w, int64_t cols, const uint16_t* x, float* y, int64_t r,
                                         int64_t gap) {
  const int64_t steps = (cols + 31) / 32;
  const __mmask32 tail = __mmask32(_bzhi_u32(0xffffffffu, unsigned(cols - (steps - 1) * 32)));
  __m512 acc[2][R];
  for (int i = 0; i < R; ++i) acc[0][i] = acc[1][i] = _mm512_setzero_ps();
  for (int64_t s = 0; s < steps; ++s) {
    __m512bh xv = x_at(x, s);
    __mmask32 m = s + 1 < steps ? __mmask32(0xffffffffu) : tail;
    for (int i = 0; i < R; ++i)
      acc[s & 1][i] = _mm512_dpbf16_ps(acc[s & 1][i],
                                       (__m512bh)_mm512_maskz_loadu_epi16(m, w + (r + i * gap) * cols + s * 32), xv);
  }
  for (int i = 0; i < R; ++i) y[r + i * gap] = _mm512_reduce_add_ps(_mm512_add_ps(acc[0][i], acc[1][i]));
}

// Dense rows r0..r1 in GROUP_ROWS runs, as rows_dot_bf16 (sequential streams the prefetcher follows).
BF16DOT void rows_dense_dot(const uint16_t* w, int64_t cols, const uint16_t* x, float* y, int64_t r0, int64_t r1) {
  in_runs(r0, r1, [&](int64_t r, int64_t run) { rows_dense_dot_group<GROUP_ROWS>(w, cols, x, y, r, run); },
          [&](int64_t r) { rows_dense_dot_group<1>(w, cols, x, y, r, 0); });
}

// fp16 / fp32 bitmask rows; x in column order.
VBMI2 void rows_vbmi2(const uint8_t* mask, int64_t stride, const void* values, const int64_t* offsets, Kind kind,
                      const float* x, float* y, int64_t cols, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = mask + r * stride;
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    if (kind == F32) {
      const float* v = static_cast<const float*>(values) + offsets[r];
      for (int64_t c = 0; c < cols; c += 16) {
        __mmask16 bits = __mmask16(mask_bits(row, c, cols, 16));
        int n = _mm_popcnt_u32(bits);
        __m512 w = _mm512_maskz_expand_ps(bits, _mm512_maskz_loadu_ps(__mmask16(_bzhi_u32(0xffffu, n)), v));
        acc0 = _mm512_fmadd_ps(w, _mm512_maskz_loadu_ps(bits, x + c), acc0);
        v += n;
      }
    } else {
      const uint16_t* v = static_cast<const uint16_t*>(values) + offsets[r];
      for (int64_t c = 0; c < cols; c += 32) {
        uint32_t bits = mask_bits(row, c, cols, 32);
        int n = _mm_popcnt_u32(bits);
        __m512i w = _mm512_maskz_expand_epi16(bits, _mm512_maskz_loadu_epi16(_bzhi_u32(0xffffffffu, n), v));
        __m512 lo = _mm512_cvtph_ps(_mm512_castsi512_si256(w));
        __m512 hi = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(w, 1));
        acc0 = _mm512_fmadd_ps(lo, _mm512_maskz_loadu_ps(__mmask16(bits), x + c), acc0);
        acc1 = _mm512_fmadd_ps(hi, _mm512_maskz_loadu_ps(__mmask16(bits >> 16), x + c + 16), acc1);
        v += n;
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

// Dense bf16 rows, x in lane order: four rows at a time share each load of x (AVX-512BW is enough).
__attribute__((target("avx512f,avx512bw,avx512vl,bmi2"))) void rows_dense_bf16(const uint16_t* w, int64_t cols, const float* x, float* y, int64_t r0, int64_t r1) {
  const int64_t steps = cols / 32;
  const __mmask32 tail = __mmask32(_bzhi_u32(0xffffffffu, unsigned(cols % 32)));
  const __m512i zero = _mm512_setzero_si512();
  int64_t r = r0;
  for (; r + 4 <= r1; r += 4) {
    __m512 lo[4], hi[4];
    for (int i = 0; i < 4; ++i) lo[i] = hi[i] = _mm512_setzero_ps();
    for (int64_t s = 0; s <= steps; ++s) {
      if (s == steps && !tail) break;
      __m512 xl = _mm512_loadu_ps(x + s * 32), xh = _mm512_loadu_ps(x + s * 32 + 16);
      for (int i = 0; i < 4; ++i) {
        const uint16_t* p = w + (r + i) * cols + s * 32;
        __m512i v = s < steps ? _mm512_loadu_si512(p) : _mm512_maskz_loadu_epi16(tail, p);
        lo[i] = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_unpacklo_epi16(zero, v)), xl, lo[i]);
        hi[i] = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_unpackhi_epi16(zero, v)), xh, hi[i]);
      }
    }
    for (int i = 0; i < 4; ++i) y[r + i] = _mm512_reduce_add_ps(_mm512_add_ps(lo[i], hi[i]));
  }
  for (; r < r1; ++r) {
    __m512 lo = _mm512_setzero_ps(), hi = _mm512_setzero_ps();
    for (int64_t s = 0; s <= steps; ++s) {
      if (s == steps && !tail) break;
      const uint16_t* p = w + r * cols + s * 32;
      __m512i v = s < steps ? _mm512_loadu_si512(p) : _mm512_maskz_loadu_epi16(tail, p);
      lo = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_unpacklo_epi16(zero, v)), _mm512_loadu_ps(x + s * 32), lo);
      hi = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_unpackhi_epi16(zero, v)), _mm512_loadu_ps(x + s * 32 + 16), hi);
    }
    y[r] = _mm512_reduce_add_ps(_mm512_add_ps(lo, hi));
  }
}

void rows_dense_portable(const uint16_t* w, int64_t cols, const float* x, float* y, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    float acc = 0.f;
    for (int64_t c = 0; c < cols; ++c) acc += half_to_float(w[r * cols + c], BF16) * x[c];
    y[r] = acc;
  }
}

int64_t best_isa() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl")) {
    if (!__builtin_cpu_supports("avx512vbmi2") || !__builtin_cpu_supports("bmi2")) return 1;
    return __builtin_cpu_supports("avx512bf16") ? 3 : 2;
  }
  return 0;
}

// x (any of the three dtypes, `cols` elements) as fp32, in lane order (zero-padded to whole 32-column blocks)
// when `lanes`, else in column order.
std::vector<float> widened(const torch::Tensor& x, int64_t cols, bool lanes) {
  TORCH_CHECK(x.is_contiguous() && x.numel() == cols, "x: [cols], contiguous");
  Kind kind = kind_of(x);
  std::vector<float> out(lanes ? (cols + 31) / 32 * 32 : cols, 0.f);
  const void* data = x.data_ptr();
  for (int64_t c = 0; c < cols; ++c) out[lanes ? lane_order(c) : c] = element(data, c, kind);
  return out;
}

// A bf16 x as it is, zero-padded to whole 32-column blocks (the dot path reads x 32 columns at a time).
std::vector<uint16_t> padded_bf16(const torch::Tensor& x, int64_t cols) {
  TORCH_CHECK(x.is_contiguous() && x.numel() == cols, "x: [cols], contiguous");
  std::vector<uint16_t> out((cols + 31) / 32 * 32, 0);
  std::memcpy(out.data(), x.data_ptr(), cols * 2);
  return out;
}

// y (fp32 [rows], the sums) plus the bias, as `like`'s dtype: rounded once.
torch::Tensor finish(const std::vector<float>& sums, const c10::optional<torch::Tensor>& bias, const torch::Tensor& like) {
  int64_t rows = int64_t(sums.size());
  auto y = torch::empty({rows}, like.options());
  Kind out = kind_of(like);
  const void* b = nullptr;
  Kind bias_kind = F32;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->is_contiguous() && bias->numel() == rows, "bias: [rows]");
    b = bias->data_ptr();
    bias_kind = kind_of(*bias);
  }
  void* data = y.data_ptr();
  for (int64_t r = 0; r < rows; ++r) {
    float v = b ? sums[r] + element(b, r, bias_kind) : sums[r];
    if (out == F32) static_cast<float*>(data)[r] = v;
    else if (out == BF16) static_cast<at::BFloat16*>(data)[r] = at::BFloat16(v);
    else static_cast<at::Half*>(data)[r] = at::Half(v);
  }
  return y;
}

std::vector<float> bitmask_sums(const torch::Tensor& x, const torch::Tensor& mask, const torch::Tensor& values,
                                const torch::Tensor& offsets, int64_t cols, int64_t isa) {
  TORCH_CHECK(mask.dtype() == torch::kUInt8 && mask.dim() == 2 && mask.is_contiguous() &&
              mask.size(1) == (cols + 7) / 8, "mask: uint8 [rows, ceil(cols / 8)]");
  TORCH_CHECK(offsets.dtype() == torch::kInt64 && offsets.is_contiguous() && offsets.numel() == mask.size(0) + 1,
              "offsets: int64 [rows + 1]");
  TORCH_CHECK(values.dim() == 1 && values.is_contiguous(), "values: 1-D");
  Kind kind = kind_of(values);
  int64_t rows = mask.size(0);
  const int64_t* off = offsets.data_ptr<int64_t>();
  TORCH_CHECK(off[0] == 0 && off[rows] == values.numel(), "offsets do not span the values");
  isa = std::min(isa, best_isa());
  const uint8_t* m = mask.data_ptr<uint8_t>();
  const void* v = values.data_ptr();
  int64_t stride = mask.size(1);
  std::vector<float> y(rows);
  if (isa >= 3 && kind == BF16 && kind_of(x) == BF16) {
    std::vector<uint16_t> xb = padded_bf16(x, cols);
    at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
      rows_dot_bf16(m, stride, static_cast<const uint16_t*>(v), off, xb.data(), y.data(), cols, r0, r1);
    });
    return y;
  }
  bool lanes = isa >= 2 && kind == BF16;
  std::vector<float> xs = widened(x, cols, lanes);
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    if (lanes) rows_vbmi2_bf16(m, stride, static_cast<const uint16_t*>(v), off, xs.data(), y.data(), cols, r0, r1);
    else if (isa >= 2) rows_vbmi2(m, stride, v, off, kind, xs.data(), y.data(), cols, r0, r1);
    else if (isa == 1) rows_avx512f(m, stride, v, off, kind, xs.data(), y.data(), cols, r0, r1);
    else rows_portable(m, stride, v, off, kind, xs.data(), y.data(), cols, r0, r1);
  });
  return y;
}

}  // namespace

// x: [cols] (fp32, bf16 or fp16); mask: uint8 [rows, ceil(cols / 8)]; values: 1-D; offsets: int64 [rows + 1].
// Returns the fp32 sums [rows].
torch::Tensor bitmask_gemv(torch::Tensor x, torch::Tensor mask, torch::Tensor values, torch::Tensor offsets,
                           int64_t cols, int64_t isa) {
  return finish(bitmask_sums(x, mask, values, offsets, cols, isa), c10::nullopt, x.to(torch::kFloat32));
}

// A packed linear layer on one token: (sums + bias) rounded once to x's dtype, [rows].
torch::Tensor bitmask_linear(torch::Tensor x, torch::Tensor mask, torch::Tensor values, torch::Tensor offsets,
                             c10::optional<torch::Tensor> bias, int64_t cols, int64_t isa) {
  return finish(bitmask_sums(x, mask, values, offsets, cols, isa), bias, x);
}

// A dense bf16 linear layer on one token: weight bf16 [rows, cols]; (sums + bias) rounded once to x's dtype.
torch::Tensor dense_linear(torch::Tensor x, torch::Tensor weight, c10::optional<torch::Tensor> bias, int64_t isa) {
  TORCH_CHECK(weight.dtype() == torch::kBFloat16 && weight.dim() == 2 && weight.is_contiguous(), "weight: bf16 [rows, cols]");
  int64_t rows = weight.size(0), cols = weight.size(1);
  isa = std::min(isa, best_isa());
  const uint16_t* w = reinterpret_cast<const uint16_t*>(weight.data_ptr());
  std::vector<float> y(rows);
  if (isa >= 3 && kind_of(x) == BF16) {
    std::vector<uint16_t> xb = padded_bf16(x, cols);
    at::parallel_for(0, rows, 64, [&](int64_t r0, int64_t r1) { rows_dense_dot(w, cols, xb.data(), y.data(), r0, r1); });
    return finish(y, bias, x);
  }
  std::vector<float> xs = widened(x, cols, isa >= 1);
  at::parallel_for(0, rows, 64, [&](int64_t r0, int64_t r1) {
    if (isa >= 1) rows_dense_bf16(w, cols, xs.data(), y.data(), r0, r1);
    else rows_dense_portable(w, cols, xs.data(), y.data(), r0, r1);
  });
  return finish(y, bias, x);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("bitmask_gemv", &bitmask_gemv, "batch-1 GEMV of a bitmask-packed weight (fp32 sums)");
  module.def("bitmask_linear", &bitmask_linear, "batch-1 packed linear layer, in x's dtype");
  module.def("dense_linear", &dense_linear, "batch-1 dense bf16 linear layer, in x's dtype");
  module.def("best_isa", &best_isa, "3: AVX-512 BF16 + VBMI2, 2: AVX-512 VBMI2, 1: AVX-512F/BW/VL, 0: portable");
}
