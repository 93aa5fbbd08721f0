// Python bindings of the cuBLAS product path (csrc/cuda/aten_products_binding.cpp) for
// the tests: its code is plain ATen, so it runs on CPU tensors too, which lets the tests
// check its math on a machine without a GPU (on a GPU it runs through cuBLAS).
#include <torch/extension.h>

#include "aten_products.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("covpool", &mpncov::cuda::covpool_aten);
  m.def("covpool_backward", &mpncov::cuda::covpool_backward_aten);
  m.def("sqrtm", &mpncov::cuda::sqrtm_aten);
  m.def("sqrtm_backward", &mpncov::cuda::sqrtm_backward_aten);
}
