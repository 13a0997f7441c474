// CUDA kernels behind the edge_sdk TensorRT plugins (see ../ops.py for the op contract).
// Plain CUDA C++, no TensorRT types: the GPU check (benchmarks/gpu_kernels.py) launches the
// same entry points through CuPy against the NumPy references.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cuda_runtime_api.h>

namespace edge_sdk {

enum class Dtype : int32_t { kFloat32 = 0, kFloat16 = 1 };

// --- Int4GroupwiseGemm: y[M, N] = x[M, K] @ (codes[K, N] * scales[K / group, N]) ---------------
// qweight: int8 [K, N / 2], column 2j in the low nibble of byte j (ONNX's INT4 packing of W^T).
// M <= kGemvMaxRows takes the split-K GEMV (decode); larger M the tiled GEMM (prefill).
constexpr int kGemvMaxRows = 4;
size_t int4GemmWorkspaceBytes(int64_t m, int64_t n, int64_t k);
cudaError_t int4Gemm(Dtype dtype, void const* x, int8_t const* qweight, void const* scales, void* y,
                     int64_t m, int64_t n, int64_t k, int32_t group, void* workspace, cudaStream_t stream);

// --- EdgeAttention: RoPE, in-place KV append, causal GQA attention ------------------------------
struct AttentionShape {
    int32_t batch, seq, heads, kvHeads, headDim, capacity;
};
size_t attentionWorkspaceBytes(AttentionShape const& s);
cudaError_t attention(Dtype dtype, AttentionShape const& s, void const* qkv, void* kvCache,
                      int32_t const* pastLengths, void const* cos, void const* sin, void const* qScale,
                      void* out, void* workspace, cudaStream_t stream);

} // namespace edge_sdk
