// posattn._C: the one pybind11 module. Launchers take raw pointers as integers, sizes, int64
// strides and a stream handle; no torch headers (STYLE.md). Links only the CUDA runtime, so it
// imports on a machine with no GPU; launchers then raise RuntimeError.
#include <pybind11/pybind11.h>
#include <cuda_runtime.h>
#include <string>

namespace py = pybind11;

namespace {

int device_count() {
  int n = 0;
  cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no device" error
    return 0;
  }
  return n;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "posattn CUDA C++ kernels (raw-pointer launchers; no libtorch)";
  m.attr("cuda_archs") = POSATTN_CUDA_ARCHS;
  m.attr("cuda_runtime_version") = CUDART_VERSION;
  m.def("device_count", &device_count, "Number of CUDA devices visible to the CUDA runtime (0 without a GPU).");
}
