// The `nearest` (1..MAX_NEAREST) codebook centres of each descriptor, nearest first, by
// |c_j|^2 - 2 d.c_j (the squared distance less |d|^2), ties to the lowest j.
// One block of ASSIGN_THREADS per descriptor: each thread keeps the sorted best `nearest` of its
// strided share of the centres (j rises, so an equal distance keeps the lower j), then `nearest`
// rounds each take the smallest (distance, j) head over the block and advance its owner's list.
// CPU reference: CpuKernels.nearest_words.
#include "descriptor.cuh"

#define ASSIGN_THREADS 256

__device__ __forceinline__ bool before(float da, int ia, float db, int ib) {
    return da < db || (da == db && ia < ib);
}

extern "C" __global__ void nearest_words(const float* descriptors, const float* centres,
                                         const float* norms, int vocabulary, int nearest,
                                         int* words, float* distances) {
    __shared__ float d[DIMENSION];
    __shared__ float head_distance[ASSIGN_THREADS];
    __shared__ int head_index[ASSIGN_THREADS];
    __shared__ int head_owner[ASSIGN_THREADS];
    int k = blockIdx.x, t = threadIdx.x;
    for (int i = t; i < DIMENSION; i += blockDim.x) d[i] = descriptors[(size_t)k * DIMENSION + i];
    __syncthreads();
    float best_distance[MAX_NEAREST];
    int best_index[MAX_NEAREST];
    for (int n = 0; n < nearest; ++n) {
        best_distance[n] = INFINITY;
        best_index[n] = 0x7fffffff;
    }
    for (int j = t; j < vocabulary; j += blockDim.x) {
        const float* c = centres + (size_t)j * DIMENSION;
        float dot = 0.0f;
        for (int i = 0; i < DIMENSION; ++i) dot += d[i] * c[i];
        float distance = norms[j] - 2.0f * dot;
        if (distance < best_distance[nearest - 1]) {
            int n = nearest - 1;
            while (n > 0 && best_distance[n - 1] > distance) {
                best_distance[n] = best_distance[n - 1];
                best_index[n] = best_index[n - 1];
                --n;
            }
            best_distance[n] = distance;
            best_index[n] = j;
        }
    }
    int taken = 0;
    for (int round = 0; round < nearest; ++round) {
        head_distance[t] = taken < nearest ? best_distance[taken] : INFINITY;
        head_index[t] = taken < nearest ? best_index[taken] : 0x7fffffff;
        head_owner[t] = t;
        __syncthreads();
        for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
            if (t < stride && before(head_distance[t + stride], head_index[t + stride], head_distance[t],
                                     head_index[t])) {
                head_distance[t] = head_distance[t + stride];
                head_index[t] = head_index[t + stride];
                head_owner[t] = head_owner[t + stride];
            }
            __syncthreads();
        }
        if (t == 0) {
            words[(size_t)k * nearest + round] = head_index[0];
            distances[(size_t)k * nearest + round] = head_distance[0];
        }
        if (t == head_owner[0]) ++taken;
        __syncthreads();  // every thread has read the winner before the next round's heads overwrite it
    }
}
