// Constants shared by the colour-texture kernels. kernels/spec.py is their definition: the launcher
// passes each as -D<NAME>=<value>, and tests/kernels/test_sources.py checks these defaults match.
#pragma once
#ifndef CHANNELS
#define CHANNELS 3
#endif
#ifndef BINS
#define BINS 6
#endif
#ifndef RESPONSES
#define RESPONSES 8
#endif
#ifndef ORIENTATIONS
#define ORIENTATIONS 4
#endif
#ifndef BASIS_COUNT
#define BASIS_COUNT 7
#endif
#ifndef PATCH
#define PATCH 32
#endif
#ifndef DIMENSION
#define DIMENSION 576
#endif
#ifndef MAX_NEAREST
#define MAX_NEAREST 32
#endif

// OpenCV's BORDER_REFLECT_101: ... 2 1 | 0 1 2 ... n-1 | n-2 n-3 ...
__device__ __forceinline__ int reflect101(int i, int n) {
    if (n == 1) return 0;
    while (i < 0 || i >= n) {
        if (i < 0) i = -i;
        if (i >= n) i = 2 * n - 2 - i;
    }
    return i;
}
