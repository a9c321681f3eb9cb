// Few-row products of the packed linears' int4 codes in gift_quant's own layout (gift_quant/cpu_int4.py packs it;
// gift_quant/cpu_rows.py builds this file with head_rows.cpp on first use).
//
// y[m, n] = Σ_k x[m, k] · W[n, k], W[n, k] = (q[n, k] - 8) · scale[g, n] + offset[g, n], q in [0, 15], g = k / group;
// scale and offset are the bf16 pairs of torch's int4 kernel ((K/group, N, 2), reused as they are). The codes are
// stored 16 output rows at a time: packed[b, o, r, j] (uint8 (N/16, K/8, 16, 4)) holds q[16b + r, 8o + j] in its
// low nibble and q[16b + r, 8o + 4 + j] in its high one, so one 64-byte load feeds 16 output rows, one vector lane
// each, and no horizontal sum is needed (torch's layout, one row after the other, needs one per row and group).
//
// Activations are rounded to int16 per group (step = the group's absmax / 32767, as in head_rows.cpp), Σ (q - 8)·x̂
// is summed exactly in int32, and each group is added in float32 in one order for every row and every path:
// t = float(Σ)·step, t = t·scale, acc = acc + t, acc = acc + offset·(step·Σx̂). The AVX-512 VNNI loop (vpdpwssd on
// 16 rows) and the scalar loop do exactly these operations (-ffp-contract=off): the same bits on every CPU; only
// where the vector loop is compiled is the op faster than torch's kernel (cpu_int4 uses it there alone).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "rows.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#include <immintrin.h>
#define GIFT_QUANT_VNNI 1
#else
#define GIFT_QUANT_VNNI 0
#endif

namespace {

using namespace gift_quant_rows;

constexpr int64_t kRows = 16;  // output rows per block of the layout
constexpr int64_t kGrain = 8;  // a thread per 8 blocks (128 output rows) at most

// One row of x in the form every path reads: int16 per group, each group's step, Σx̂·step, and Σx̂.
struct Activations {
  const int16_t* q;
  const float* step;
  const float* offset_weight;  // step · Σx̂ per group (what each offset multiplies)
  const int32_t* qsum;
};

float bf16_float(uint16_t bits) {
  const uint32_t word = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &word, sizeof f);
  return f;
}

int32_t code(const uint8_t* block, int64_t r, int64_t k) {
  const uint8_t byte = block[((k / 8) * kRows + r) * 4 + (k % 4)];
  return (k % 8) < 4 ? (byte & 15) : (byte >> 4);
}

// 16 output rows of one row of x, one lane at a time.
void block_scalar(const uint8_t* block, const uint16_t* so, const Activations& a, int64_t k, int64_t n,
                  int64_t group, float* y) {
  for (int64_t r = 0; r < kRows; ++r) {
    float acc = 0.f;
    for (int64_t g = 0; g < k / group; ++g) {
      int32_t dot = 0;
      for (int64_t j = g * group; j < (g + 1) * group; ++j) dot += code(block, r, j) * a.q[j];
      dot -= 8 * a.qsum[g];
      const uint16_t* pair = so + (g * n + r) * 2;
      float t = static_cast<float>(dot) * a.step[g];
      t = t * bf16_float(pair[0]);
      acc = acc + t;
      acc = acc + bf16_float(pair[1]) * a.offset_weight[g];
    }
    y[r] = acc;
  }
}

// A row of x that holds an Inf or NaN: the weights dequantized and multiplied in float32, so they propagate.
void block_exact(const uint8_t* block, const uint16_t* so, const float* x, int64_t k, int64_t n, int64_t group,
                 float* y) {
  for (int64_t r = 0; r < kRows; ++r) {
    float acc = 0.f;
    for (int64_t j = 0; j < k; ++j) {
      const uint16_t* pair = so + ((j / group) * n + r) * 2;
      const float w = static_cast<float>(code(block, r, j) - 8) * bf16_float(pair[0]) + bf16_float(pair[1]);
      acc += x[j] * w;
    }
    y[r] = acc;
  }
}

#if GIFT_QUANT_VNNI
// The same 16 rows for R rows of x at once (each 64-byte load unpacked once for all R), one vector lane per output
// row. Widened to int16, the low nibbles of a load are columns 8o..8o+3 of each output row (four int16, two lanes a
// row) and the high ones 8o+4..8o+7; vpdpwssd against those four activations (broadcast) adds two products per
// lane, and the pairs of lanes are added at the group's end. y[r * n + lane] for row r of x.
template <int R>
void block_vnni(const uint8_t* block, const uint16_t* so, const Activations* a, int64_t k, int64_t n,
                int64_t group, float* y) {
  const __m512i nibble = _mm512_set1_epi8(15);
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  const __m512i high_half = _mm512_set1_epi32(static_cast<int32_t>(0xFFFF0000u));
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < k / group; ++g) {
    // Output rows 0-7 and 8-15, low and high nibbles apart: four independent chains hide vpdpwssd's latency.
    __m512i low_lanes0[R], high_lanes0[R], low_lanes1[R], high_lanes1[R];
    for (int r = 0; r < R; ++r) {
      low_lanes0[r] = high_lanes0[r] = low_lanes1[r] = high_lanes1[r] = _mm512_setzero_si512();
    }
    for (int64_t o = g * group / 8; o < (g + 1) * group / 8; ++o) {
      const __m512i bytes = _mm512_loadu_si512(block + o * kRows * 4);
      const __m512i low = _mm512_and_si512(bytes, nibble);
      const __m512i high = _mm512_and_si512(_mm512_srli_epi16(bytes, 4), nibble);
      const __m512i low0 = _mm512_cvtepu8_epi16(_mm512_castsi512_si256(low));
      const __m512i high0 = _mm512_cvtepu8_epi16(_mm512_castsi512_si256(high));
      const __m512i low1 = _mm512_cvtepu8_epi16(_mm512_extracti64x4_epi64(low, 1));
      const __m512i high1 = _mm512_cvtepu8_epi16(_mm512_extracti64x4_epi64(high, 1));
      for (int r = 0; r < R; ++r) {
        int64_t xa, xb;
        std::memcpy(&xa, a[r].q + o * 8, sizeof xa);
        std::memcpy(&xb, a[r].q + o * 8 + 4, sizeof xb);
        const __m512i first = _mm512_set1_epi64(xa), second = _mm512_set1_epi64(xb);
        low_lanes0[r] = _mm512_dpwssd_epi32(low_lanes0[r], low0, first);
        high_lanes0[r] = _mm512_dpwssd_epi32(high_lanes0[r], high0, second);
        low_lanes1[r] = _mm512_dpwssd_epi32(low_lanes1[r], low1, first);
        high_lanes1[r] = _mm512_dpwssd_epi32(high_lanes1[r], high1, second);
      }
    }
    const __m512i pairs = _mm512_loadu_si512(so + g * n * 2);  // 16 (scale, offset) bf16 pairs
    const __m512 scale = _mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16));
    const __m512 offset = _mm512_castsi512_ps(_mm512_and_si512(pairs, high_half));
    for (int r = 0; r < R; ++r) {
      const __m512i lanes0 = _mm512_add_epi32(low_lanes0[r], high_lanes0[r]);
      const __m512i lanes1 = _mm512_add_epi32(low_lanes1[r], high_lanes1[r]);
      __m512i dot = _mm512_add_epi32(_mm512_permutex2var_epi32(lanes0, even, lanes1),
                                     _mm512_permutex2var_epi32(lanes0, odd, lanes1));
      dot = _mm512_sub_epi32(dot, _mm512_set1_epi32(8 * a[r].qsum[g]));
      __m512 t = _mm512_mul_ps(_mm512_cvtepi32_ps(dot), _mm512_set1_ps(a[r].step[g]));
      t = _mm512_mul_ps(t, scale);
      acc[r] = _mm512_add_ps(acc[r], t);
      acc[r] = _mm512_add_ps(acc[r], _mm512_mul_ps(offset, _mm512_set1_ps(a[r].offset_weight[g])));
    }
  }
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(y + r * n, acc[r]);
}

// Rows of x in chunks of up to 4 (registers: four accumulators each).
void rows_vnni(const uint8_t* block, const uint16_t* so, const Activations* a, int64_t rows, int64_t k, int64_t n,
               int64_t group, float* y) {
  for (int64_t m = 0; m < rows; m += 4) {
    switch (std::min<int64_t>(4, rows - m)) {
      case 4: block_vnni<4>(block, so, a + m, k, n, group, y + m * n); break;
      case 3: block_vnni<3>(block, so, a + m, k, n, group, y + m * n); break;
      case 2: block_vnni<2>(block, so, a + m, k, n, group, y + m * n); break;
      default: block_vnni<1>(block, so, a + m, k, n, group, y + m * n);
    }
  }
}
#endif

at::Tensor int4_linear_mm(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale_offset,
                          int64_t group, bool vectorized) {
  TORCH_CHECK(x.dim() == 2 && packed.dim() == 4 && packed.size(2) == kRows && packed.size(3) == 4,
              "int4_linear_mm: x (M, K) and packed (N/16, K/8, 16, 4) expected");
  const int64_t k = x.size(1), n = packed.size(0) * kRows;
  TORCH_CHECK(group > 0 && group % 8 == 0 && group <= 4096 && k % group == 0 && packed.size(1) * 8 == k,
              "int4_linear_mm: a group of at most 4096 columns, a multiple of 8 dividing K, expected");
  TORCH_CHECK(packed.scalar_type() == at::kByte && scale_offset.scalar_type() == at::kBFloat16 &&
                  scale_offset.dim() == 3 && scale_offset.size(0) == k / group && scale_offset.size(1) == n &&
                  scale_offset.size(2) == 2,
              "int4_linear_mm: uint8 codes and bf16 (K/group, N, 2) scales and offsets expected");
  const auto [xc, w, so] = cpu_inputs("int4_linear_mm", x, packed, scale_offset, /*keep_bf16=*/true);
  const bool bf16 = xc.scalar_type() == at::kBFloat16;  // a decode step's dtype, read as it is
  const int64_t rows = xc.size(0), groups = k / group;
  const QuantizedRows xq = bf16 ? quantize(xc.data_ptr<at::BFloat16>(), rows, k, group)
                                : quantize(xc.data_ptr<float>(), rows, k, group);
  const bool all_finite = std::all_of(xq.finite.begin(), xq.finite.end(), [](char f) { return f != 0; });
  const at::Tensor xf = bf16 && !all_finite ? xc.to(at::kFloat) : xc;  // the exact path reads float32
  std::vector<float> offset_weight(rows * groups);
  for (int64_t i = 0; i < rows * groups; ++i) offset_weight[i] = static_cast<float>(xq.sum[i]) * xq.step[i];
  at::Tensor y = at::empty({rows, n}, x.options().dtype(at::kFloat));
  const float* X = all_finite ? nullptr : xf.data_ptr<float>();
  const uint8_t* W = w.data_ptr<uint8_t>();
  const uint16_t* SO = reinterpret_cast<const uint16_t*>(so.data_ptr<at::BFloat16>());
  float* Y = y.data_ptr<float>();
  const bool vnni = vectorized && GIFT_QUANT_VNNI;
  std::vector<Activations> acts;
  for (int64_t m = 0; m < rows; ++m) {
    acts.push_back({xq.q.data() + m * k, xq.step.data() + m * groups, offset_weight.data() + m * groups,
                    xq.sum.data() + m * groups});
  }
  at::parallel_for(0, n / kRows, kGrain, [&](int64_t first, int64_t last) {
    for (int64_t b = first; b < last; ++b) {
      const uint8_t* block = W + b * (k / 8) * kRows * 4;
      const uint16_t* block_so = SO + b * kRows * 2;
      float* yb = Y + b * kRows;
#if GIFT_QUANT_VNNI
      if (vnni && all_finite) {
        rows_vnni(block, block_so, acts.data(), rows, k, n, group, yb);
        continue;
      }
#endif
      for (int64_t m = 0; m < rows; ++m) {
        if (!xq.finite[m]) {
          block_exact(block, block_so, X + m * k, k, n, group, yb + m * n);
        } else if (vnni) {
#if GIFT_QUANT_VNNI
          block_vnni<1>(block, block_so, &acts[m], k, n, group, yb + m * n);
#endif
        } else {
          block_scalar(block, block_so, acts[m], k, n, group, yb + m * n);
        }
      }
    }
  });
  return y;
}

bool int4_linear_vectorized() { return GIFT_QUANT_VNNI; }

}  // namespace

TORCH_LIBRARY_FRAGMENT(gift_quant, m) {
  m.def("int4_linear_mm(Tensor x, Tensor packed, Tensor scale_offset, int group, bool vectorized=True) -> Tensor");
  m.def("int4_linear_vectorized() -> bool", &int4_linear_vectorized);
}

TORCH_LIBRARY_IMPL(gift_quant, CPU, m) { m.impl("int4_linear_mm", &int4_linear_mm); }
