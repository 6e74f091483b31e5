// aten::mm.dtype_out for CPU tensors, for csrc/emulate/emulate.py (not built into the package): half operands,
// float32 out, as cuBLAS forms it on the GPU (half·half products are exact in float32; float32 sums).
#include <ATen/ATen.h>
#include <torch/library.h>

static at::Tensor& mm_dtype_out_cpu(const at::Tensor& a, const at::Tensor& b, at::ScalarType dtype, at::Tensor& out) {
  TORCH_CHECK(dtype == at::kFloat && out.scalar_type() == at::kFloat, "emulated mm.dtype_out: float32 output only");
  out.copy_(at::mm(a.to(at::kFloat), b.to(at::kFloat)));
  return out;
}

TORCH_LIBRARY_IMPL(aten, CPU, m) { m.impl("mm.dtype_out", TORCH_FN(mm_dtype_out_cpu)); }
