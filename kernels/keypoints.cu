// Keypoint candidates: pixels no neighbour within `radius` exceeds, above `threshold`. The host sorts
// them (saliency descending, then raster order) and keeps the first max_count, as
// CpuKernels.select_keypoints does.
#include "descriptor.cuh"

extern "C" __global__ void local_maxima(const float* saliency, int h, int w, int radius,
                                        float threshold, int* found, int* count, int capacity) {
    int x = blockIdx.x * blockDim.x + threadIdx.x;
    int y = blockIdx.y * blockDim.y + threadIdx.y;
    if (x >= w || y >= h) return;
    float v = saliency[y * w + x];
    if (!(v > threshold)) return;
    for (int dy = -radius; dy <= radius; ++dy) {
        int yy = y + dy;
        if (yy < 0 || yy >= h) continue;
        for (int dx = -radius; dx <= radius; ++dx) {
            int xx = x + dx;
            if (xx < 0 || xx >= w) continue;
            if (saliency[yy * w + xx] > v) return;
        }
    }
    int slot = atomicAdd(count, 1);
    if (slot < capacity) found[slot] = y * w + x;
}
