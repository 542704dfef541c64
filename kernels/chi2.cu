// Batched chi-squared distances between L1-normalised histograms: out[q, m] = sum_w
// (a_w - b_w)^2 / (a_w + b_w), words absent from both adding 0. One block per (item, query).
// CPU reference: CpuKernels.chi2_distances.
#include "descriptor.cuh"

#define CHI2_THREADS 256

extern "C" __global__ void chi2_distances(const float* queries, const float* items, int items_count,
                                          int vocabulary, float* out) {
    __shared__ float partial[CHI2_THREADS];
    int m = blockIdx.x, q = blockIdx.y, t = threadIdx.x;
    const float* a = queries + (size_t)q * vocabulary;
    const float* b = items + (size_t)m * vocabulary;
    float acc = 0.0f;
    for (int w = t; w < vocabulary; w += blockDim.x) {
        float s = a[w] + b[w];
        if (s > 0.0f) { float d = a[w] - b[w]; acc += d * d / s; }
    }
    partial[t] = acc;
    __syncthreads();
    for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
        if (t < stride) partial[t] += partial[t + stride];
        __syncthreads();
    }
    if (t == 0) out[(size_t)q * items_count + m] = partial[0];
}
