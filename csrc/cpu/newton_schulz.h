// The coupled Newton-Schulz recurrence of iSQRT (SPEC section 2) on one sample's n x n
// matrix A, and its forward-mode derivative. Shared by sqrtm (C x C, A = sym(S) / tr(S))
// and the Gram-space pipeline (M x M, A = Xc^T Xc / (M t); SPEC section 8):
//
//   T0 = 1.5 I - 0.5 A;  Z1 = T0;  Y1 = A Z1
//   Tk = 1.5 I - 0.5 Zk Yk;  Y(k+1) = Yk Tk;  Z(k+1) = Tk Zk          k = 1 .. N-1
//
// sqrtm's result is Y_N (for N = 1, Y1 = 0.5 A (3I - A)); the Gram path's is Z_N (for N = 1,
// Z1 = T0, no product at all). Every iterate is a polynomial in A, so all of them are
// symmetric and commute, and Y_k = A Z_k for every k (induction: Y1 = A Z1, and
// Y(k+1) = Yk Tk = A Zk Tk = A Tk Zk = A Z(k+1)). Each product therefore has a symmetric
// result, computed as its block upper triangle and mirrored up to kMaxMirroredIters steps;
// beyond that only the Y products are mirrored (see limits.h).
#pragma once

#include <cstdint>

#include "../limits.h"

namespace mpncov {

// Which iterate is the result of the recurrence: Y_N (sqrtm) or Z_N (Gram space).
enum class NewtonSchulzResult { y, z };

// Which products with a symmetric result are computed as their mirrored upper triangle.
struct Mirroring {
  bool y;    // Y(k+1) = Yk Tk, and dY(k+1) in the derivative: always
  bool z_t;  // Tk from Zk Yk, Z(k+1) = Tk Zk, and their derivatives
  static Mirroring for_iters(int64_t N) { return {true, mirrors_all_products(N)}; }
};

// Where one sample's iterates live (each n x n, dense): Y_1.. at y, Z_1 at z1, Z_2.. at z2,
// T_1..T_{N-1} at t, and the result (Y_N or Z_N) at `last`. The two users lay them out
// differently (sqrtm_cpu.cpp, isqrt_cov_gram_cpu.cpp); the recurrence only sees this map.
// With keeps_t false the T_k are not kept: `t` is one scratch matrix that each step of the
// forward overwrites and the derivative recomputes T_k = 1.5 I - 0.5 Z_k Y_k into (one
// product per step more in the derivative, N-1 matrices fewer kept).
template <typename T>
struct NewtonSchulzIterates {
  int64_t N, n;
  NewtonSchulzResult result;
  T *y, *z1, *z2, *t, *last;
  bool keeps_t = true;

  int64_t nn() const { return n * n; }
  T* Y(int64_t k) const {
    return (result == NewtonSchulzResult::y && k == N) ? last : y + (k - 1) * nn();
  }
  T* Z(int64_t k) const {
    if (k == 1) return z1;
    return (result == NewtonSchulzResult::z && k == N) ? last : z2 + (k - 2) * nn();
  }
  T* Tk(int64_t k) const { return keeps_t ? t + (k - 1) * nn() : t; }
  T* final_iterate() const { return result == NewtonSchulzResult::y ? Y(N) : Z(N); }
};

// Matrices of iterates a backward keeps per sample: 3(N-1)+1 in both layouts (sqrtm:
// Y_1..Y_{N-1}, Z_1..Z_{N-1}, T_1..T_{N-1}, Y_N; the Gram space: G in place of Z_1, Z_N in
// place of Y_N).
constexpr int64_t newton_schulz_saved_count(int64_t N) { return 3 * (N - 1) + 1; }

// Z1 = T0 = 1.5 I - 0.5 A (out may not alias a). The forward and the derivative compute it
// with this one function, so a recomputed Z1 is bitwise the forward's.
template <typename T>
void newton_schulz_first_z(const T* a, T* out, int64_t n);

// The recurrence on `a` (n x n, symmetric): writes Z1 and every iterate the derivative
// needs (Y_1..Y_{N-1}, Z_1..Z_{N-1}, T_1..T_{N-1}) and the result.
template <typename T>
void newton_schulz(const T* a, const NewtonSchulzIterates<T>& it);

// Work matrices of newton_schulz_derivative, in n x n units.
constexpr int64_t kNewtonSchulzDerivativeWork = 5;

// The derivative of the result (Y_N or Z_N) at A in the symmetric direction E, from the
// iterates of newton_schulz (forward-mode differentiation: it runs in the direction of the
// recurrence, so it needs no transposes; every derivative is symmetric, a symmetric-valued
// function differentiated along a symmetric direction):
//   dZ1 = -0.5 E,  dY1 = E Z1 + A dZ1 = 1.5 E - 0.5 (E A + A E)
//   dTk = -0.5 (dZk Yk + Zk dYk)
//   dY(k+1) = dYk Tk + Yk dTk,   dZ(k+1) = dTk Zk + Tk dZk
// At a symmetric A the Frechet derivative L(A, .) of a polynomial is self-adjoint and
// commutes with transposition, so this is also the gradient: for f = the result,
// <G, L(A, V)> = <L(A, sym G), V> for every G and V. Returns the work matrix that holds it.
template <typename T>
T* newton_schulz_derivative(const T* e, const T* a, const NewtonSchulzIterates<T>& it, T* work);

}  // namespace mpncov
