#include "newton_schulz.h"

#include <algorithm>
#include <utility>

#include "elementwise.h"
#include "matrix_product.h"

namespace mpncov {
namespace {

// An n x n operand / result of one sample.
template <typename T>
MatrixView<const T> in(const T* p, int64_t n) {
  return dense<const T>(p, n, n);
}
template <typename T>
MatrixView<T> out(T* p, int64_t n) {
  return dense<T>(p, n, n);
}

// Tk = 1.5 I - 0.5 Zk Yk into it.Tk(k): the forward's step, and the derivative's
// recomputation when the T_k are not kept (bitwise the forward's).
template <typename T>
void compute_t(const NewtonSchulzIterates<T>& it, int64_t k, const Mirroring& mirror) {
  T* tk = it.Tk(k);
  matrix_product<T>(out(tk, it.n), {{in(it.Z(k), it.n), in(it.Y(k), it.n), T(-0.5)}}, T(0),
                    mirror.z_t);
  add_identity(out(tk, it.n), T(1.5));
}

}  // namespace

template <typename T>
void newton_schulz_first_z(const T* a, T* z1, int64_t n) {
  scale_into(z1, a, T(-0.5), n * n);
  add_identity(out(z1, n), T(1.5));
}

template <typename T>
void newton_schulz(const T* a, const NewtonSchulzIterates<T>& it) {
  const int64_t N = it.N, n = it.n;
  const bool result_y = it.result == NewtonSchulzResult::y;
  const Mirroring mirror = Mirroring::for_iters(N);
  if (N == 1 && result_y) {
    // Y1 = A T0 = 1.5 A - 0.5 A A (sqrtm keeps no Z1 for N = 1).
    T* y = it.Y(1);
    std::copy(a, a + it.nn(), y);
    matrix_product<T>(out(y, n), {{in(a, n), in(a, n), T(-0.5)}}, T(1.5), mirror.y);
    return;
  }
  newton_schulz_first_z(a, it.Z(1), n);
  if (N == 1) return;  // the result Z1 = T0
  matrix_product<T>(out(it.Y(1), n), {{in(a, n), in(it.Z(1), n), T(1)}}, T(0), mirror.y);
  for (int64_t k = 1; k <= N - 1; ++k) {
    // Tk = 1.5 I - 0.5 Zk Yk;  Y(k+1) = Yk Tk;  Z(k+1) = Tk Zk (the last step: the result only)
    const bool last = k == N - 1;
    compute_t(it, k, mirror);
    const T* tk = it.Tk(k);
    if (!last || result_y)
      matrix_product<T>(out(it.Y(k + 1), n), {{in(it.Y(k), n), in(tk, n), T(1)}}, T(0),
                        mirror.y);
    if (!last || !result_y)
      matrix_product<T>(out(it.Z(k + 1), n), {{in(tk, n), in(it.Z(k), n), T(1)}}, T(0),
                        mirror.z_t);
  }
}

template <typename T>
T* newton_schulz_derivative(const T* e, const T* a, const NewtonSchulzIterates<T>& it, T* work) {
  const int64_t N = it.N, n = it.n, nn = it.nn();
  const bool result_y = it.result == NewtonSchulzResult::y;
  const Mirroring mirror = Mirroring::for_iters(N);
  T *dy = work, *dz = work + nn, *dt = work + 2 * nn, *dy_next = work + 3 * nn,
    *dz_next = work + 4 * nn;
  scale_into(dz, e, T(-0.5), nn);  // dZ1
  if (N == 1 && !result_y) return dz;
  // dY1 = 1.5 E - 0.5 (E A + A E)
  std::copy(e, e + nn, dy);
  matrix_product<T>(out(dy, n), {{in(e, n), in(a, n), T(-0.5)}, {in(a, n), in(e, n), T(-0.5)}},
                    T(1.5), mirror.y);
  if (N == 1) return dy;
  for (int64_t k = 1; k <= N - 1; ++k) {
    const bool last = k == N - 1;
    if (!it.keeps_t) compute_t(it, k, mirror);
    matrix_product<T>(out(dt, n), {{in(dz, n), in(it.Y(k), n), T(-0.5)},
                                   {in(it.Z(k), n), in(dy, n), T(-0.5)}}, T(0), mirror.z_t);
    if (!last || result_y) {
      matrix_product<T>(out(dy_next, n), {{in(dy, n), in(it.Tk(k), n), T(1)},
                                          {in(it.Y(k), n), in(dt, n), T(1)}}, T(0), mirror.y);
      std::swap(dy, dy_next);
    }
    if (!last || !result_y) {
      matrix_product<T>(out(dz_next, n), {{in(dt, n), in(it.Z(k), n), T(1)},
                                          {in(it.Tk(k), n), in(dz, n), T(1)}}, T(0), mirror.z_t);
      std::swap(dz, dz_next);
    }
  }
  return result_y ? dy : dz;
}

template void newton_schulz_first_z<float>(const float*, float*, int64_t);
template void newton_schulz_first_z<double>(const double*, double*, int64_t);
template void newton_schulz<float>(const float*, const NewtonSchulzIterates<float>&);
template void newton_schulz<double>(const double*, const NewtonSchulzIterates<double>&);
template float* newton_schulz_derivative<float>(const float*, const float*,
                                                const NewtonSchulzIterates<float>&, float*);
template double* newton_schulz_derivative<double>(const double*, const double*,
                                                  const NewtonSchulzIterates<double>&, double*);

}  // namespace mpncov
