// Nearest codebook centre per descriptor: argmin_j |c_j|^2 - 2 d.c_j, ties to the lowest j.
// One block per descriptor. CPU reference: CpuKernels.assign_words.
#include "descriptor.cuh"

#define ASSIGN_THREADS 256

extern "C" __global__ void assign_words(const float* descriptors, const float* centres,
                                        const float* norms, int vocabulary, int* words) {
    __shared__ float d[DIMENSION];
    __shared__ float best_distance[ASSIGN_THREADS];
    __shared__ int best_index[ASSIGN_THREADS];
    int k = blockIdx.x, t = threadIdx.x;
    for (int i = t; i < DIMENSION; i += blockDim.x) d[i] = descriptors[k * DIMENSION + i];
    __syncthreads();
    float best = INFINITY;
    int index = 0x7fffffff;
    for (int j = t; j < vocabulary; j += blockDim.x) {
        const float* c = centres + (size_t)j * DIMENSION;
        float dot = 0.0f;
        for (int i = 0; i < DIMENSION; ++i) dot += d[i] * c[i];
        float distance = norms[j] - 2.0f * dot;
        if (distance < best) { best = distance; index = j; }
    }
    best_distance[t] = best;
    best_index[t] = index;
    __syncthreads();
    for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
        if (t < stride) {
            float od = best_distance[t + stride];
            int oi = best_index[t + stride];
            if (od < best_distance[t] || (od == best_distance[t] && oi < best_index[t])) {
                best_distance[t] = od;
                best_index[t] = oi;
            }
        }
        __syncthreads();
    }
    if (t == 0) words[k] = best_index[0];
}
