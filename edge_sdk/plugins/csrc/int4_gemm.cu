// Int4GroupwiseGemm kernels. Weight layout (what the exporter writes, see ../ops.py): W^T [K, N]
// with two int4 codes per byte, so one row k of N columns is N / 2 contiguous bytes.
//
// GEMV (decode, M <= 4): each thread owns 8 consecutive output columns (one 32-bit load per row
// k), a warp reads 128 contiguous bytes of a row: coalesced, every weight byte read once. The K
// axis is split across blockIdx.y so a 3B decoder's narrowest GEMV still fills the GPU; partial
// sums go to the float32 workspace and a second kernel adds them and casts.
// GEMM (prefill): 64 x 64 output tiles, K in steps of 32, x and the dequantized W tile staged in
// shared memory, 4 x 4 outputs per thread. Plain FMA, no tensor cores: correct first.
#include "dtype.cuh"
#include "kernels.h"

namespace edge_sdk {
namespace {

__device__ __forceinline__ float nibble(uint32_t word, int i) {
    return static_cast<float>(static_cast<int32_t>(word << (28 - 4 * i)) >> 28);  // sign-extended
}

constexpr int kGemvThreads = 128;  // x 8 columns = 1024 columns per block
constexpr int kGemvRowsPerSplit = 256;

int64_t gemvSplits(int64_t k) { return (k + kGemvRowsPerSplit - 1) / kGemvRowsPerSplit; }

template <typename T, int M>
__global__ void int4GemvKernel(T const* __restrict__ x, uint32_t const* __restrict__ qweight,
                               T const* __restrict__ scales, float* __restrict__ partial, int64_t n,
                               int64_t k, int32_t group) {
    __shared__ float xs[M][kGemvRowsPerSplit];
    int64_t const k0 = static_cast<int64_t>(blockIdx.y) * kGemvRowsPerSplit;
    int64_t const k1 = min(k, k0 + kGemvRowsPerSplit);
    for (int64_t i = threadIdx.x; i < (k1 - k0); i += blockDim.x)
        for (int m = 0; m < M; ++m) xs[m][i] = toFloat(x[m * k + k0 + i]);
    __syncthreads();
    int64_t const col8 = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;  // 8 columns
    if (col8 * 8 >= n) return;
    float acc[M][8] = {};
    float s[8];
    int64_t const words = n / 8;
    for (int64_t kk = k0; kk < k1; ++kk) {
        if (kk == k0 || kk % group == 0) {
            T const* row = scales + (kk / group) * n + col8 * 8;
            for (int j = 0; j < 8; ++j) s[j] = toFloat(row[j]);
        }
        uint32_t const w = __ldg(qweight + kk * words + col8);
        for (int j = 0; j < 8; ++j) {
            float const wj = nibble(w, j) * s[j];
            for (int m = 0; m < M; ++m) acc[m][j] += xs[m][kk - k0] * wj;
        }
    }
    for (int m = 0; m < M; ++m)
        for (int j = 0; j < 8; ++j) partial[(static_cast<int64_t>(blockIdx.y) * M + m) * n + col8 * 8 + j] = acc[m][j];
}

template <typename T>
__global__ void sumSplitsKernel(float const* __restrict__ partial, T* __restrict__ y, int64_t mn, int64_t splits) {
    int64_t const i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i >= mn) return;
    float total = 0.f;
    for (int64_t sp = 0; sp < splits; ++sp) total += partial[sp * mn + i];
    y[i] = fromFloat<T>(total);
}

constexpr int kTile = 64, kStep = 32;

template <typename T>
__global__ void int4GemmKernel(T const* __restrict__ x, uint8_t const* __restrict__ qweight,
                               T const* __restrict__ scales, T* __restrict__ y, int64_t m, int64_t n,
                               int64_t k, int32_t group) {
    __shared__ float xs[kTile][kStep + 1];
    __shared__ float ws[kStep][kTile + 1];
    int const tx = threadIdx.x % 16, ty = threadIdx.x / 16;  // 256 threads, 4 x 4 outputs each
    int64_t const row0 = static_cast<int64_t>(blockIdx.y) * kTile, col0 = static_cast<int64_t>(blockIdx.x) * kTile;
    float acc[4][4] = {};
    for (int64_t kb = 0; kb < k; kb += kStep) {
        for (int i = threadIdx.x; i < kTile * kStep; i += blockDim.x) {
            int const r = i / kStep, c = i % kStep;
            int64_t const gr = row0 + r, gk = kb + c;
            xs[r][c] = (gr < m && gk < k) ? toFloat(x[gr * k + gk]) : 0.f;
            int const wr = i / kTile, wc = i % kTile;
            int64_t const wk = kb + wr, wn = col0 + wc;
            float w = 0.f;
            if (wk < k && wn < n) {
                uint8_t const byte = qweight[wk * (n / 2) + wn / 2];
                int const code = (wn & 1) ? (static_cast<int8_t>(byte) >> 4)
                                          : (static_cast<int8_t>(static_cast<uint8_t>(byte << 4)) >> 4);
                w = static_cast<float>(code) * toFloat(scales[(wk / group) * n + wn]);
            }
            ws[wr][wc] = w;
        }
        __syncthreads();
        for (int c = 0; c < kStep; ++c)
            for (int i = 0; i < 4; ++i)
                for (int j = 0; j < 4; ++j) acc[i][j] += xs[ty * 4 + i][c] * ws[c][tx * 4 + j];
        __syncthreads();
    }
    for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j) {
            int64_t const r = row0 + ty * 4 + i, c = col0 + tx * 4 + j;
            if (r < m && c < n) y[r * n + c] = fromFloat<T>(acc[i][j]);
        }
}

template <typename T>
cudaError_t launch(void const* xv, int8_t const* qweight, void const* sv, void* yv, int64_t m, int64_t n,
                   int64_t k, int32_t group, void* workspace, cudaStream_t stream) {
    auto const* x = static_cast<T const*>(xv);
    auto const* s = static_cast<T const*>(sv);
    auto* y = static_cast<T*>(yv);
    if (m <= kGemvMaxRows) {
        dim3 const grid(static_cast<unsigned>((n / 8 + kGemvThreads - 1) / kGemvThreads),
                        static_cast<unsigned>(gemvSplits(k)));
        auto* partial = static_cast<float*>(workspace);
        auto const* w = reinterpret_cast<uint32_t const*>(qweight);
        switch (m) {
        case 1: int4GemvKernel<T, 1><<<grid, kGemvThreads, 0, stream>>>(x, w, s, partial, n, k, group); break;
        case 2: int4GemvKernel<T, 2><<<grid, kGemvThreads, 0, stream>>>(x, w, s, partial, n, k, group); break;
        case 3: int4GemvKernel<T, 3><<<grid, kGemvThreads, 0, stream>>>(x, w, s, partial, n, k, group); break;
        default: int4GemvKernel<T, 4><<<grid, kGemvThreads, 0, stream>>>(x, w, s, partial, n, k, group); break;
        }
        int64_t const mn = m * n;
        sumSplitsKernel<T><<<static_cast<unsigned>((mn + 255) / 256), 256, 0, stream>>>(partial, y, mn, gemvSplits(k));
    } else {
        dim3 const grid(static_cast<unsigned>((n + kTile - 1) / kTile), static_cast<unsigned>((m + kTile - 1) / kTile));
        int4GemmKernel<T><<<grid, 256, 0, stream>>>(x, reinterpret_cast<uint8_t const*>(qweight), s, y, m, n, k, group);
    }
    return cudaGetLastError();
}

} // namespace

size_t int4GemmWorkspaceBytes(int64_t m, int64_t n, int64_t k) {
    return m <= kGemvMaxRows ? static_cast<size_t>(gemvSplits(k) * kGemvMaxRows * n) * sizeof(float) : 0;
}

cudaError_t int4Gemm(Dtype dtype, void const* x, int8_t const* qweight, void const* scales, void* y, int64_t m,
                     int64_t n, int64_t k, int32_t group, void* workspace, cudaStream_t stream) {
    if (n % 8 != 0 || group <= 0 || k % group != 0) return cudaErrorInvalidValue;
    return dtype == Dtype::kFloat16
        ? launch<__half>(x, qweight, scales, y, m, n, k, group, workspace, stream)
        : launch<float>(x, qweight, scales, y, m, n, k, group, workspace, stream);
}

} // namespace edge_sdk

// C entry points for the GPU check (CuPy loads the library and calls these).
extern "C" int edge_sdk_int4_gemm(int32_t dtype, void const* x, int8_t const* qweight, void const* scales, void* y,
                                  int64_t m, int64_t n, int64_t k, int32_t group, void* workspace, cudaStream_t stream) {
    return static_cast<int>(edge_sdk::int4Gemm(static_cast<edge_sdk::Dtype>(dtype), x, qweight, scales, y, m, n, k,
                                               group, workspace, stream));
}

extern "C" size_t edge_sdk_int4_gemm_workspace(int64_t m, int64_t n, int64_t k) {
    return edge_sdk::int4GemmWorkspaceBytes(m, n, k);
}
