// sRGB uint8 -> CIE Lab (D65), each channel scaled to [0, 1]. CPU reference: CpuKernels.rgb_to_lab.
#include "descriptor.cuh"

extern "C" __global__ void rgb_to_lab(const unsigned char* rgb, float* lab, int pixels,
                                      const float* rgb_to_xyz /* 3x3, rows over the white point */,
                                      float epsilon, float kappa) {
    int p = blockIdx.x * blockDim.x + threadIdx.x;
    if (p >= pixels) return;
    float linear[3];
    for (int k = 0; k < 3; ++k) {
        float c = rgb[3 * p + k] * (1.0f / 255.0f);
        linear[k] = c <= 0.04045f ? c * (1.0f / 12.92f) : powf((c + 0.055f) * (1.0f / 1.055f), 2.4f);
    }
    float f[3];
    for (int r = 0; r < 3; ++r) {
        float t = rgb_to_xyz[3 * r] * linear[0] + rgb_to_xyz[3 * r + 1] * linear[1]
                + rgb_to_xyz[3 * r + 2] * linear[2];
        f[r] = t > epsilon ? cbrtf(t) : t * (kappa / 116.0f) + 16.0f / 116.0f;
    }
    float out[3] = {1.16f * f[1] - 0.16f,
                    (500.0f * (f[0] - f[1]) + 128.0f) * (1.0f / 255.0f),
                    (200.0f * (f[1] - f[2]) + 128.0f) * (1.0f / 255.0f)};
    for (int k = 0; k < 3; ++k) lab[3 * p + k] = fminf(fmaxf(out[k], 0.0f), 1.0f);
}
