// Texture-weighted colour histograms of 32x32 patches, one block per keypoint, for one level.
// CPU reference: CpuKernels.patch_histograms (the same sums; float order differs within a patch).
#include "descriptor.cuh"

// lab (h, w, CHANNELS), responses (h, w, CHANNELS, RESPONSES); ys, xs already shifted to this level;
// out (count, CHANNELS, BINS, levels, RESPONSES), this level's slots overwritten.
extern "C" __global__ void patch_histograms(const float* lab, const float* responses, int h, int w,
                                            const int* ys, const int* xs, int level, int levels,
                                            float eps, float* out) {
    __shared__ float hist[CHANNELS * BINS * RESPONSES];
    int k = blockIdx.x;
    for (int i = threadIdx.x; i < CHANNELS * BINS * RESPONSES; i += blockDim.x) hist[i] = 0.0f;
    __syncthreads();
    int half = PATCH / 2;
    for (int i = threadIdx.x; i < PATCH * PATCH; i += blockDim.x) {
        int y = ys[k] - half + i / PATCH, x = xs[k] - half + i % PATCH;
        if (y < 0 || y >= h || x < 0 || x >= w) continue;
        int p = y * w + x;
        for (int c = 0; c < CHANNELS; ++c) {
            int b = min((int)(lab[p * CHANNELS + c] * (float)BINS), BINS - 1);
            for (int r = 0; r < RESPONSES; ++r)
                atomicAdd(&hist[(c * BINS + b) * RESPONSES + r],
                          fabsf(responses[(p * CHANNELS + c) * RESPONSES + r]) + eps);
        }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < CHANNELS * BINS * RESPONSES; i += blockDim.x) {
        int cb = i / RESPONSES, r = i % RESPONSES;
        out[((k * CHANNELS * BINS + cb) * levels + level) * RESPONSES + r] = hist[i];
    }
}
