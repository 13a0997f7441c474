// EdgeAttention kernels: RoPE + in-place KV append, then causal grouped-query attention.
//
// 1. ropeAppendKernel: one thread per (token, head, rotation pair). Queries are rotated and
//    scaled into the float32 workspace; keys are rotated and, with the values, written straight
//    into the cache at position past_lengths[b] + t. Nothing else in the cache is touched, and
//    there is one cache buffer (the plugin's output 1 aliases input 1).
// 2. attentionKernel: one block per (head, token, sequence), online softmax over the visible
//    keys in chunks of kChunk (scores in shared memory, running max and sum), output accumulated
//    by threads over head_dim. Scores and softmax in float32 for either dtype.
#include "dtype.cuh"
#include "kernels.h"

namespace edge_sdk {
namespace {

constexpr int kThreads = 128;
constexpr int kChunk = 512;
constexpr int kMaxHeadDim = 256;

// cache element (b, kind 0 = key / 1 = value, kv head, position, d)
__device__ __forceinline__ int64_t cacheIndex(AttentionShape const& s, int b, int kind, int h, int64_t pos, int d) {
    return ((((static_cast<int64_t>(b) * 2 + kind) * s.kvHeads + h) * s.capacity + pos) * s.headDim) + d;
}

template <typename T>
__global__ void ropeAppendKernel(AttentionShape s, T const* __restrict__ qkv, T* __restrict__ cache,
                                 int32_t const* __restrict__ pastLengths, T const* __restrict__ cosT,
                                 T const* __restrict__ sinT, T const* __restrict__ qScale, float* __restrict__ qRot) {
    int const half = s.headDim / 2;
    int const width = (s.heads + 2 * s.kvHeads) * s.headDim;
    int64_t const total = static_cast<int64_t>(s.batch) * s.seq * (s.heads + 2 * s.kvHeads) * half;
    int64_t const i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i >= total) return;
    int const d = static_cast<int>(i % half);
    int const head = static_cast<int>((i / half) % (s.heads + 2 * s.kvHeads));
    int64_t const token = i / half / (s.heads + 2 * s.kvHeads);  // b * seq + t
    int const b = static_cast<int>(token / s.seq), t = static_cast<int>(token % s.seq);
    T const* src = qkv + token * width + static_cast<int64_t>(head) * s.headDim;
    float const x1 = toFloat(src[d]), x2 = toFloat(src[d + half]);
    int64_t const pos = pastLengths[b] + t;
    if (head >= s.heads + s.kvHeads) {  // value: copied as is
        int const h = head - s.heads - s.kvHeads;
        cache[cacheIndex(s, b, 1, h, pos, d)] = src[d];
        cache[cacheIndex(s, b, 1, h, pos, d + half)] = src[d + half];
        return;
    }
    T const* c = cosT + token * s.headDim;
    T const* sn = sinT + token * s.headDim;
    float const r1 = x1 * toFloat(c[d]) - x2 * toFloat(sn[d]);
    float const r2 = x2 * toFloat(c[d + half]) + x1 * toFloat(sn[d + half]);
    if (head < s.heads) {  // query: rotated, scaled and rounded to T as the standard graph does
        float const scale = toFloat(qScale[token]);
        float* dst = qRot + (token * s.heads + head) * s.headDim;
        dst[d] = toFloat(fromFloat<T>(toFloat(fromFloat<T>(r1)) * scale));
        dst[d + half] = toFloat(fromFloat<T>(toFloat(fromFloat<T>(r2)) * scale));
    } else {
        int const h = head - s.heads;
        cache[cacheIndex(s, b, 0, h, pos, d)] = fromFloat<T>(r1);
        cache[cacheIndex(s, b, 0, h, pos, d + half)] = fromFloat<T>(r2);
    }
}

template <typename T>
__global__ void attentionKernel(AttentionShape s, T const* __restrict__ cache, int32_t const* __restrict__ pastLengths,
                                float const* __restrict__ qRot, T* __restrict__ out) {
    __shared__ float q[kMaxHeadDim];
    __shared__ float scores[kChunk];
    __shared__ float reduce[kThreads / 32];
    int const h = blockIdx.x, t = blockIdx.y, b = blockIdx.z;
    int const kvh = h / (s.heads / s.kvHeads);
    int64_t const token = static_cast<int64_t>(b) * s.seq + t;
    int64_t const visible = static_cast<int64_t>(pastLengths[b]) + t + 1;
    for (int d = threadIdx.x; d < s.headDim; d += blockDim.x) q[d] = qRot[(token * s.heads + h) * s.headDim + d];
    __syncthreads();
    float runMax = -INFINITY, runSum = 0.f;
    float acc[kMaxHeadDim / kThreads] = {};
    for (int64_t start = 0; start < visible; start += kChunk) {
        int const n = static_cast<int>(min(static_cast<int64_t>(kChunk), visible - start));
        float localMax = -INFINITY;
        for (int j = threadIdx.x; j < n; j += blockDim.x) {
            T const* key = cache + cacheIndex(s, b, 0, kvh, start + j, 0);
            float dot = 0.f;
            for (int d = 0; d < s.headDim; ++d) dot += q[d] * toFloat(key[d]);
            scores[j] = dot;
            localMax = fmaxf(localMax, dot);
        }
        for (int off = 16; off > 0; off /= 2) localMax = fmaxf(localMax, __shfl_xor_sync(0xffffffffu, localMax, off));
        if (threadIdx.x % 32 == 0) reduce[threadIdx.x / 32] = localMax;
        __syncthreads();
        float chunkMax = reduce[0];
        for (int w = 1; w < kThreads / 32; ++w) chunkMax = fmaxf(chunkMax, reduce[w]);
        float const newMax = fmaxf(runMax, chunkMax);
        float const rescale = __expf(runMax - newMax);  // 0 on the first chunk
        __syncthreads();
        float localSum = 0.f;
        for (int j = threadIdx.x; j < n; j += blockDim.x) {
            // probabilities rounded to T before the value product, as the standard graph does
            float const p = toFloat(fromFloat<T>(__expf(scores[j] - newMax)));
            scores[j] = p;
            localSum += p;
        }
        for (int off = 16; off > 0; off /= 2) localSum += __shfl_xor_sync(0xffffffffu, localSum, off);
        if (threadIdx.x % 32 == 0) reduce[threadIdx.x / 32] = localSum;
        __syncthreads();
        float chunkSum = 0.f;
        for (int w = 0; w < kThreads / 32; ++w) chunkSum += reduce[w];
        runSum = runSum * rescale + chunkSum;
        runMax = newMax;
        for (int r = 0; r * kThreads + static_cast<int>(threadIdx.x) < s.headDim; ++r) {
            int const d = r * kThreads + threadIdx.x;
            float a = acc[r] * rescale;
            for (int j = 0; j < n; ++j) a += scores[j] * toFloat(cache[cacheIndex(s, b, 1, kvh, start + j, d)]);
            acc[r] = a;
        }
        __syncthreads();
    }
    for (int r = 0; r * kThreads + static_cast<int>(threadIdx.x) < s.headDim; ++r) {
        int const d = r * kThreads + threadIdx.x;
        out[(token * s.heads + h) * s.headDim + d] = fromFloat<T>(acc[r] / runSum);
    }
}

template <typename T>
cudaError_t launch(AttentionShape const& s, void const* qkv, void* cache, int32_t const* pastLengths, void const* cosT,
                   void const* sinT, void const* qScale, void* out, void* workspace, cudaStream_t stream) {
    auto* qRot = static_cast<float*>(workspace);
    int64_t const pairs = static_cast<int64_t>(s.batch) * s.seq * (s.heads + 2 * s.kvHeads) * (s.headDim / 2);
    ropeAppendKernel<T><<<static_cast<unsigned>((pairs + 255) / 256), 256, 0, stream>>>(
        s, static_cast<T const*>(qkv), static_cast<T*>(cache), pastLengths, static_cast<T const*>(cosT),
        static_cast<T const*>(sinT), static_cast<T const*>(qScale), qRot);
    dim3 const grid(s.heads, s.seq, s.batch);
    attentionKernel<T><<<grid, kThreads, 0, stream>>>(s, static_cast<T const*>(cache), pastLengths, qRot,
                                                      static_cast<T*>(out));
    return cudaGetLastError();
}

} // namespace

size_t attentionWorkspaceBytes(AttentionShape const& s) {
    return static_cast<size_t>(s.batch) * s.seq * s.heads * s.headDim * sizeof(float);
}

cudaError_t attention(Dtype dtype, AttentionShape const& s, void const* qkv, void* kvCache, int32_t const* pastLengths,
                      void const* cos, void const* sin, void const* qScale, void* out, void* workspace,
                      cudaStream_t stream) {
    if (s.headDim % 2 != 0 || s.headDim > kMaxHeadDim || s.kvHeads <= 0 || s.heads % s.kvHeads != 0)
        return cudaErrorInvalidValue;
    return dtype == Dtype::kFloat16
        ? launch<__half>(s, qkv, kvCache, pastLengths, cos, sin, qScale, out, workspace, stream)
        : launch<float>(s, qkv, kvCache, pastLengths, cos, sin, qScale, out, workspace, stream);
}

} // namespace edge_sdk

extern "C" int edge_sdk_attention(int32_t dtype, int32_t batch, int32_t seq, int32_t heads, int32_t kvHeads,
                                  int32_t headDim, int32_t capacity, void const* qkv, void* kvCache,
                                  int32_t const* pastLengths, void const* cos, void const* sin, void const* qScale,
                                  void* out, void* workspace, cudaStream_t stream) {
    edge_sdk::AttentionShape const s{batch, seq, heads, kvHeads, headDim, capacity};
    return static_cast<int>(edge_sdk::attention(static_cast<edge_sdk::Dtype>(dtype), s, qkv, kvCache, pastLengths,
                                                cos, sin, qScale, out, workspace, stream));
}

extern "C" size_t edge_sdk_attention_workspace(int32_t batch, int32_t seq, int32_t heads, int32_t headDim) {
    return edge_sdk::attentionWorkspaceBytes(edge_sdk::AttentionShape{batch, seq, heads, 1, headDim, 0});
}
