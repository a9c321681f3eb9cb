// What gift_quant's few-row CPU ops share (head_rows.cpp, linear_rows.cpp): the inputs as the kernels read them,
// and activations rounded to int16 per block of columns.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

namespace gift_quant_rows {

constexpr float kMax = 32767.f;

struct QuantizedRows {
  std::vector<int16_t> q;  // (rows, blocks * block), zero-padded to whole blocks
  std::vector<float> step;  // (rows, blocks)
  std::vector<int32_t> sum;  // (rows, blocks): Σ of the block's int16 values (what a zero point or offset multiplies)
  std::vector<char> finite;  // (rows,)
};

// The inputs as the kernels read them: x in float32 (bf16 kept where the kernel reads it as it is: a conversion
// costs more than a small linear's product), codes and scales contiguous, all on the CPU.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> cpu_inputs(const char* op, const at::Tensor& x,
                                                          const at::Tensor& codes, const at::Tensor& scales,
                                                          bool keep_bf16 = false) {
  TORCH_CHECK(x.device().is_cpu() && codes.device().is_cpu() && scales.device().is_cpu(), op,
              ": CPU tensors expected");
  const bool keep = keep_bf16 && x.scalar_type() == at::kBFloat16;
  return {(keep ? x : x.to(at::kFloat)).contiguous(), codes.contiguous(), scales.contiguous()};
}

// x (rows, k) as int16 per block of `block` columns, with each block's step (x float32 or bf16).
template <typename T>
QuantizedRows quantize(const T* x, int64_t rows, int64_t k, int64_t block) {
  const int64_t blocks = (k + block - 1) / block;
  QuantizedRows r{std::vector<int16_t>(rows * blocks * block, 0), std::vector<float>(rows * blocks, 0.f),
                  std::vector<int32_t>(rows * blocks, 0), std::vector<char>(rows, 1)};
  for (int64_t m = 0; m < rows; ++m) {
    for (int64_t b = 0; b < blocks; ++b) {
      const T* xb = x + m * k + b * block;
      const int64_t width = std::min(block, k - b * block);
      float amax = 0.f;
      bool finite = true;
      for (int64_t j = 0; j < width; ++j) {
        const float v = static_cast<float>(xb[j]);
        finite = finite && std::isfinite(v);
        amax = std::max(amax, std::fabs(v));
      }
      if (!finite) {
        r.finite[m] = 0;
        continue;
      }
      // A block below ~1e-34 (32767 / amax overflows) counts as zeros: its step would be a denormal anyway.
      const bool tiny = !(amax > 0.f) || !std::isfinite(kMax / amax);
      const float inv = tiny ? 0.f : kMax / amax;
      int16_t* qb = r.q.data() + (m * blocks + b) * block;
      int32_t sum = 0;
      for (int64_t j = 0; j < width; ++j) {
        qb[j] = static_cast<int16_t>(std::clamp(std::nearbyint(static_cast<float>(xb[j]) * inv), -kMax, kMax));
        sum += qb[j];
      }
      r.sum[m * blocks + b] = sum;
      r.step[m * blocks + b] = tiny ? 0.f : amax / kMax;
    }
  }
  return r;
}

}  // namespace gift_quant_rows
