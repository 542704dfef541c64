// Steering of the G2/H2 basis into 4 orientations (even, odd), the lightness orientation channels,
// and the saliency built from them. CPU references: CpuKernels.steer and CpuKernels.saliency.
#include "descriptor.cuh"

// basis (BASIS_COUNT, pixels, CHANNELS) -> responses (pixels, CHANNELS, RESPONSES) and
// amplitude (ORIENTATIONS, pixels) = sqrt(even^2 + odd^2) of channel 0 (lightness).
extern "C" __global__ void steer(const float* basis, float* responses, float* amplitude, int pixels,
                                 const float* steering /* RESPONSES x BASIS_COUNT */) {
    int p = blockIdx.x * blockDim.x + threadIdx.x;
    if (p >= pixels) return;
    for (int c = 0; c < CHANNELS; ++c) {
        float b[BASIS_COUNT];
        for (int j = 0; j < BASIS_COUNT; ++j) b[j] = basis[(j * pixels + p) * CHANNELS + c];
        float r[RESPONSES];
        for (int k = 0; k < RESPONSES; ++k) {
            float acc = 0.0f;
            for (int j = 0; j < BASIS_COUNT; ++j) acc += steering[k * BASIS_COUNT + j] * b[j];
            r[k] = acc;
            responses[(p * CHANNELS + c) * RESPONSES + k] = acc;
        }
        if (c == 0)
            for (int o = 0; o < ORIENTATIONS; ++o)
                amplitude[o * pixels + p] = sqrtf(r[2 * o] * r[2 * o] + r[2 * o + 1] * r[2 * o + 1]);
    }
}

// total (h, w) += geometric mean over orientations of (amplitude + delta) - delta, level `level`
// (amplitude (ORIENTATIONS, hs, ws)) read at (y >> level, x >> level).
extern "C" __global__ void saliency_add(const float* amplitude, float* total, int h, int w,
                                        int hs, int ws, int level, float delta) {
    int x = blockIdx.x * blockDim.x + threadIdx.x;
    int y = blockIdx.y * blockDim.y + threadIdx.y;
    if (x >= w || y >= h) return;
    int q = (y >> level) * ws + (x >> level);
    float acc = 0.0f;
    for (int o = 0; o < ORIENTATIONS; ++o) acc += logf(amplitude[o * hs * ws + q] + delta);
    total[y * w + x] += expf(acc / ORIENTATIONS) - delta;
}
