// Few-row logits of a quantized lm_head, int8 per row or int4 per group (gift_quant/cpu_rows.py builds this file on
// first use).
//
// y[m, n] = scale[n] · Σ_k x[m, k] · code[n, k], codes int8 (N, K), scales fp16 (N,): one row of the vocabulary a
// time, so the 28 MB of a 49152 x 576 head stream through the core once per token. The activations are rounded to
// int16 per block of 64 columns (step = block absmax / 32767: within half a step, 2^-16 of the block's largest
// value, where bf16 rounds each value within 2^-9 of itself), the products are summed exactly in int32 per block,
// and the blocks in float32 in a fixed order: no FMA contraction (-ffp-contract=off), so every CPU gives the same
// bits. A row of x that holds an Inf or NaN is computed in float32 instead, so they propagate as in a dense matmul.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "rows.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

namespace {

using namespace gift_quant_rows;

constexpr int64_t kBlock = 64;
constexpr uintptr_t kPrefetch = 36 * 64;  // bytes ahead of the block being read (measured: 10-15 % on a Zen 4 core)

float row_exact(const int8_t* w, const float* x, int64_t k) {
  float t = 0.f;
  for (int64_t j = 0; j < k; ++j) t += x[j] * static_cast<float>(w[j]);
  return t;
}

float row_dot(const int8_t* w, const int16_t* q, const float* step, int64_t k, int64_t blocks) {
  float t = 0.f;
  const int64_t full = k / kBlock;
  for (int64_t b = 0; b < full; ++b) {
    const int8_t* wb = w + b * kBlock;
    __builtin_prefetch(reinterpret_cast<const void*>(reinterpret_cast<uintptr_t>(wb) + kPrefetch));  // a hint only
    const int16_t* qb = q + b * kBlock;
    int32_t acc = 0;
    for (int64_t j = 0; j < kBlock; ++j) acc += static_cast<int32_t>(wb[j]) * static_cast<int32_t>(qb[j]);
    t += static_cast<float>(acc) * step[b];
  }
  if (full < blocks) {
    int32_t acc = 0;
    for (int64_t j = full * kBlock; j < k; ++j) acc += static_cast<int32_t>(w[j]) * static_cast<int32_t>(q[j]);
    t += static_cast<float>(acc) * step[full];
  }
  return t;
}

at::Tensor int8_rows_mm(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales) {
  TORCH_CHECK(x.dim() == 2 && qweight.dim() == 2 && x.size(1) == qweight.size(1),
              "int8_rows_mm: x (M, K) and qweight (N, K) expected");
  TORCH_CHECK(qweight.scalar_type() == at::kChar && scales.scalar_type() == at::kHalf &&
                  scales.numel() == qweight.size(0),
              "int8_rows_mm: int8 qweight and one fp16 scale per row expected");
  const auto [xf, w, s] = cpu_inputs("int8_rows_mm", x, qweight, scales);
  const int64_t rows = xf.size(0), k = xf.size(1), n = w.size(0), blocks = (k + kBlock - 1) / kBlock;
  const QuantizedRows xq = quantize(xf.data_ptr<float>(), rows, k, kBlock);
  at::Tensor y = at::empty({rows, n}, xf.options());
  const float* X = xf.data_ptr<float>();
  const int8_t* W = w.data_ptr<int8_t>();
  const at::Half* S = s.data_ptr<at::Half>();
  float* Y = y.data_ptr<float>();
  at::parallel_for(0, n, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int8_t* wr = W + i * k;
      const float scale = static_cast<float>(S[i]);
      for (int64_t m = 0; m < rows; ++m) {
        const float dot = xq.finite[m]
            ? row_dot(wr, xq.q.data() + m * blocks * kBlock, xq.step.data() + m * blocks, k, blocks)
            : row_exact(wr, X + m * k, k);
        Y[m * n + i] = dot * scale;
      }
    }
  });
  return y;
}

// int4: codes c in [-7, 7] stored as c + 8, two a byte (even column low), one fp16 scale per group of `group`
// columns (even, so groups own whole bytes; the last may be shorter). Activations are rounded to int16 per group,
// Σ c·q = Σ (c + 8)·q - 8·Σ q exactly in int32 (groups of at most 4096: no overflow), then t += float(acc) · step ·
// scale per group, in order.
// A row's nibbles widened to int16 once, for every row of x: int16 x int16 products summed in int32 vectorize
// (pmaddwd-style), where nibble extraction inside the dot product did not (3x slower, measured on a Zen 4 core).
void widen_nibbles(const uint8_t* w, int64_t bytes, int16_t* low, int16_t* high) {
  __builtin_prefetch(reinterpret_cast<const void*>(reinterpret_cast<uintptr_t>(w) + kPrefetch));
  for (int64_t j = 0; j < bytes; ++j) {
    low[j] = static_cast<int16_t>(w[j] & 15);
    high[j] = static_cast<int16_t>(w[j] >> 4);
  }
}

float row_dot4(const int16_t* low, const int16_t* high, const int16_t* even, const int16_t* odd,
               const int32_t* qsum, const float* step, const at::Half* scale, int64_t bytes, int64_t half_group,
               int64_t groups) {
  float t = 0.f;
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t begin = g * half_group, end = std::min(bytes, begin + half_group);
    int32_t acc = 0;
    for (int64_t j = begin; j < end; ++j) {
      acc += static_cast<int32_t>(low[j]) * even[j] + static_cast<int32_t>(high[j]) * odd[j];
    }
    acc -= 8 * qsum[g];
    t += static_cast<float>(acc) * step[g] * static_cast<float>(scale[g]);
  }
  return t;
}

float row_exact4(const uint8_t* w, const float* x, const at::Half* scale, int64_t k, int64_t group) {
  float t = 0.f;
  for (int64_t j = 0; j < k; ++j) {
    const int32_t code = (j % 2 ? w[j / 2] >> 4 : w[j / 2] & 15) - 8;
    t += x[j] * (static_cast<float>(code) * static_cast<float>(scale[j / group]));
  }
  return t;
}

at::Tensor int4_rows_mm(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales, int64_t group) {
  TORCH_CHECK(x.dim() == 2 && packed.dim() == 2 && scales.dim() == 2 && packed.size(0) == scales.size(0),
              "int4_rows_mm: x (M, K), packed (N, ceil(K/2)) and scales (N, groups) expected");
  const int64_t k = x.size(1), bytes = (k + 1) / 2, groups = (k + group - 1) / std::max<int64_t>(group, 1);
  TORCH_CHECK(group > 0 && group % 2 == 0 && group <= 4096 && packed.size(1) == bytes && scales.size(1) == groups,
              "int4_rows_mm: an even group of at most 4096 columns and matching shapes expected");
  TORCH_CHECK(packed.scalar_type() == at::kByte && scales.scalar_type() == at::kHalf,
              "int4_rows_mm: uint8 codes and fp16 scales expected");
  const auto [xf, w, s] = cpu_inputs("int4_rows_mm", x, packed, scales);
  const int64_t rows = xf.size(0), n = w.size(0);
  // int16 activations per group, split into even and odd columns (the low and high nibbles' partners).
  const QuantizedRows xq = quantize(xf.data_ptr<float>(), rows, k, group);
  std::vector<int16_t> even(rows * bytes), odd(rows * bytes);
  for (int64_t m = 0; m < rows; ++m) {
    const int16_t* q = xq.q.data() + m * groups * group;  // zero-padded to whole groups (even: covers 2 * bytes)
    for (int64_t j = 0; j < bytes; ++j) {
      even[m * bytes + j] = q[2 * j];
      odd[m * bytes + j] = q[2 * j + 1];
    }
  }
  const float* X = xf.data_ptr<float>();
  at::Tensor y = at::empty({rows, n}, xf.options());
  const uint8_t* W = w.data_ptr<uint8_t>();
  const at::Half* S = s.data_ptr<at::Half>();
  float* Y = y.data_ptr<float>();
  at::parallel_for(0, n, 256, [&](int64_t first, int64_t last) {
    std::vector<int16_t> low(bytes), high(bytes);  // per thread
    for (int64_t i = first; i < last; ++i) {
      widen_nibbles(W + i * bytes, bytes, low.data(), high.data());
      for (int64_t m = 0; m < rows; ++m) {
        Y[m * n + i] = xq.finite[m]
            ? row_dot4(low.data(), high.data(), even.data() + m * bytes, odd.data() + m * bytes,
                       xq.sum.data() + m * groups, xq.step.data() + m * groups, S + i * groups, bytes, group / 2, groups)
            : row_exact4(W + i * bytes, X + m * k, S + i * groups, k, group);
      }
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY(gift_quant, m) {
  m.def("int8_rows_mm(Tensor x, Tensor qweight, Tensor scales) -> Tensor");
  m.def("int4_rows_mm(Tensor x, Tensor packed, Tensor scales, int group) -> Tensor");
}

TORCH_LIBRARY_IMPL(gift_quant, CPU, m) {
  m.impl("int8_rows_mm", &int8_rows_mm);
  m.impl("int4_rows_mm", &int4_rows_mm);
}
