// Transposed copies of small tiles, the inner step of mirroring a symmetric result and of
// symmetrising a gradient. A scalar transpose reads one matrix down its columns, a new
// cache line per element; on x86 with AVX2 whole 8 x 8 (float) or 4 x 4 (double)
// sub-tiles are transposed in registers instead. At C = 256 that takes the mirror of a
// symmetric product from 30 to 10 us (the product: ~200 us); sqrtm on a 2-core VM, the
// two paths alternating in one process (10 rounds, medians): forward 4-11 % faster,
// backward 0-4 %.
#pragma once

#include <cstdint>

namespace mpncov {

// dst[i * ldd + j] = src[j * lds + i] for i < rows, j < cols. src and dst must not overlap.
template <typename T>
void transpose_tile(const T* src, int64_t lds, T* dst, int64_t ldd, int64_t rows,
                    int64_t cols);

// Whether transpose_tile uses the AVX2 sub-tile kernels on this machine (for tests and
// `python -m mpncov.info`).
bool transpose_uses_avx2();

}  // namespace mpncov
