// Separable filtering (correlation, reflect-101 borders, like cv2.sepFilter2D) and 2x decimation.
// CPU references: CpuKernels.filter_basis (7 basis filters) and CpuKernels.pyr_down (blur + decimate).
#include "descriptor.cuh"

// dst[y, x, c] = sum_t taps[t] * src[y, reflect(x + t - n/2), c]; images (h, w, channels) float32.
extern "C" __global__ void filter_rows(const float* src, float* dst, int h, int w, int channels,
                                       const float* taps, int n) {
    int x = blockIdx.x * blockDim.x + threadIdx.x;
    int y = blockIdx.y * blockDim.y + threadIdx.y;
    if (x >= w || y >= h) return;
    for (int c = 0; c < channels; ++c) {
        float acc = 0.0f;
        for (int t = 0; t < n; ++t)
            acc += taps[t] * src[(y * w + reflect101(x + t - n / 2, w)) * channels + c];
        dst[(y * w + x) * channels + c] = acc;
    }
}

// dst[y, x, c] = sum_t taps[t] * src[reflect(y + t - n/2), x, c].
extern "C" __global__ void filter_cols(const float* src, float* dst, int h, int w, int channels,
                                       const float* taps, int n) {
    int x = blockIdx.x * blockDim.x + threadIdx.x;
    int y = blockIdx.y * blockDim.y + threadIdx.y;
    if (x >= w || y >= h) return;
    for (int c = 0; c < channels; ++c) {
        float acc = 0.0f;
        for (int t = 0; t < n; ++t)
            acc += taps[t] * src[(reflect101(y + t - n / 2, h) * w + x) * channels + c];
        dst[(y * w + x) * channels + c] = acc;
    }
}

// dst (ceil(h/2), ceil(w/2), channels) = src[2y, 2x, c].
extern "C" __global__ void decimate2(const float* src, float* dst, int h, int w, int channels) {
    int x = blockIdx.x * blockDim.x + threadIdx.x;
    int y = blockIdx.y * blockDim.y + threadIdx.y;
    int hh = (h + 1) / 2, hw = (w + 1) / 2;
    if (x >= hw || y >= hh) return;
    for (int c = 0; c < channels; ++c)
        dst[(y * hw + x) * channels + c] = src[((2 * y) * w + 2 * x) * channels + c];
}
