// posattn._C: the one pybind11 module. Launchers take a params struct whose pointer fields are
// plain integers (torch's data_ptr()), sizes, int64 strides, and a stream handle (an integer, e.g.
// torch.cuda.current_stream().cuda_stream); no torch headers (STYLE.md). Links only the CUDA
// runtime, so it imports on a machine with no GPU; every launcher then raises RuntimeError
// "... no CUDA device ...". Launch errors and unsupported dtype/head_dim (with the compiled list)
// are raised as RuntimeError too. Python wrappers: python/posattn/_cuda.py.
#include <pybind11/pybind11.h>
#include <cuda_runtime.h>
#include <stdexcept>
#include <string>
#include "posattn/params.h"

#ifndef POSATTN_CUDA_ARCHS
#define POSATTN_CUDA_ARCHS "unknown"  // CMake defines it from POSATTN_CUDA_ARCHS
#endif

namespace py = pybind11;
using namespace posattn;

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

void require_device(const char* op) {
  int n = 0;
  const cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess || n == 0) {
    std::string why = err != cudaSuccess ? cudaGetErrorString(err) : "cudaGetDeviceCount returned 0";
    cudaGetLastError();
    throw std::runtime_error(std::string("posattn._C.") + op + ": no CUDA device (" + why + ")");
  }
}

void raise_if(const std::string& err, const char* op) {
  if (!err.empty()) throw std::runtime_error(std::string("posattn._C.") + op + ": " + err);
}

DType dtype_from(const std::string& name) {
  if (name == "float32") return DType::kFloat32;
  if (name == "float16") return DType::kFloat16;
  if (name == "bfloat16") return DType::kBFloat16;
  throw std::runtime_error("unsupported dtype " + name + "; known: float16, bfloat16, float32");
}

std::string dtype_str(DType dt) {
  switch (dt) {
    case DType::kFloat32: return "float32";
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
  }
  return "unknown";
}

// Pointer fields are exposed as integers (0 = null).
#define PTR_FIELD(Cls, field)                                                                       \
  def_property(#field, [](const Cls& s) { return reinterpret_cast<uintptr_t>(s.field); },          \
               [](Cls& s, uintptr_t v) { s.field = reinterpret_cast<decltype(s.field)>(v); })
#define FIELD(Cls, field) def_readwrite(#field, &Cls::field)
#define DTYPE_FIELD(Cls)                                                                            \
  def_property("dtype", [](const Cls& s) { return dtype_str(s.dtype); },                           \
               [](Cls& s, const std::string& v) { s.dtype = dtype_from(v); })

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "posattn CUDA C++ kernels (raw-pointer launchers; no libtorch). Wrappers: posattn._cuda";
  m.attr("cuda_archs") = POSATTN_CUDA_ARCHS;
  m.attr("cuda_runtime_version") = CUDART_VERSION;
  m.def("device_count", &device_count, "Number of CUDA devices visible to the CUDA runtime (0 without a GPU).");

  py::class_<RotaryParams>(m, "RotaryParams", "Fields of csrc/include/posattn/params.h RotaryParams.")
      .def(py::init([]() { RotaryParams p{}; return p; }))
      .PTR_FIELD(RotaryParams, x).PTR_FIELD(RotaryParams, out).PTR_FIELD(RotaryParams, cos)
      .PTR_FIELD(RotaryParams, sin).PTR_FIELD(RotaryParams, position_ids).PTR_FIELD(RotaryParams, seqlen_offsets)
      .FIELD(RotaryParams, x_stride_b).FIELD(RotaryParams, x_stride_s).FIELD(RotaryParams, x_stride_h)
      .FIELD(RotaryParams, out_stride_b).FIELD(RotaryParams, out_stride_s).FIELD(RotaryParams, out_stride_h)
      .FIELD(RotaryParams, cos_stride_s).FIELD(RotaryParams, sin_stride_s)
      .FIELD(RotaryParams, pos_stride_b).FIELD(RotaryParams, pos_stride_s)
      .FIELD(RotaryParams, batch_size).FIELD(RotaryParams, seqlen).FIELD(RotaryParams, num_heads)
      .FIELD(RotaryParams, head_dim).FIELD(RotaryParams, rotary_dim).FIELD(RotaryParams, seqlen_ro)
      .FIELD(RotaryParams, interleaved).FIELD(RotaryParams, conj).DTYPE_FIELD(RotaryParams);
  m.def("rotary", [](const RotaryParams& p, int64_t stream) {
    require_device("rotary");
    raise_if(launch_rotary(p, stream), "rotary");
  }, py::arg("params"), py::arg("stream"), "apply_rotary forward (conj=False) or backward (conj=True).");

  py::class_<UnpadIndexParams>(m, "UnpadIndexParams")
      .def(py::init([]() { UnpadIndexParams p{}; return p; }))
      .PTR_FIELD(UnpadIndexParams, mask).PTR_FIELD(UnpadIndexParams, seqlens).PTR_FIELD(UnpadIndexParams, cu_seqlens)
      .PTR_FIELD(UnpadIndexParams, indices).FIELD(UnpadIndexParams, mask_stride_b).FIELD(UnpadIndexParams, mask_stride_s)
      .FIELD(UnpadIndexParams, batch_size).FIELD(UnpadIndexParams, seqlen);
  m.def("unpad_index", [](const UnpadIndexParams& p, int64_t stream) {
    require_device("unpad_index");
    raise_if(launch_unpad_index(p, stream), "unpad_index");
  }, py::arg("params"), py::arg("stream"));

  py::class_<RowCopyParams>(m, "RowCopyParams")
      .def(py::init([]() { RowCopyParams p{}; return p; }))
      .PTR_FIELD(RowCopyParams, src).PTR_FIELD(RowCopyParams, dst).PTR_FIELD(RowCopyParams, indices)
      .FIELD(RowCopyParams, src_row_stride_bytes).FIELD(RowCopyParams, dst_row_stride_bytes)
      .FIELD(RowCopyParams, row_bytes).FIELD(RowCopyParams, num_rows).FIELD(RowCopyParams, scatter);
  m.def("row_copy", [](const RowCopyParams& p, int64_t stream) {
    require_device("row_copy");
    raise_if(launch_row_copy(p, stream), "row_copy");
  }, py::arg("params"), py::arg("stream"), "gather (scatter=False) or scatter (scatter=True) rows by int64 indices.");

  py::class_<VarlenAttnParams>(m, "VarlenAttnParams")
      .def(py::init([]() { VarlenAttnParams p{}; return p; }))
      .PTR_FIELD(VarlenAttnParams, q).PTR_FIELD(VarlenAttnParams, k).PTR_FIELD(VarlenAttnParams, v)
      .PTR_FIELD(VarlenAttnParams, out).PTR_FIELD(VarlenAttnParams, lse)
      .PTR_FIELD(VarlenAttnParams, cu_seqlens_q).PTR_FIELD(VarlenAttnParams, cu_seqlens_k)
      .PTR_FIELD(VarlenAttnParams, alibi_slopes).PTR_FIELD(VarlenAttnParams, bias_table)
      .FIELD(VarlenAttnParams, q_stride_t).FIELD(VarlenAttnParams, q_stride_h)
      .FIELD(VarlenAttnParams, k_stride_t).FIELD(VarlenAttnParams, k_stride_h)
      .FIELD(VarlenAttnParams, v_stride_t).FIELD(VarlenAttnParams, v_stride_h)
      .FIELD(VarlenAttnParams, out_stride_t).FIELD(VarlenAttnParams, out_stride_h)
      .FIELD(VarlenAttnParams, lse_stride_h).FIELD(VarlenAttnParams, alibi_stride_b)
      .FIELD(VarlenAttnParams, bias_stride_0).FIELD(VarlenAttnParams, bias_stride_1)
      .FIELD(VarlenAttnParams, batch_size).FIELD(VarlenAttnParams, num_heads).FIELD(VarlenAttnParams, num_heads_k)
      .FIELD(VarlenAttnParams, head_dim).FIELD(VarlenAttnParams, max_seqlen_q).FIELD(VarlenAttnParams, max_seqlen_k)
      .FIELD(VarlenAttnParams, softmax_scale).FIELD(VarlenAttnParams, causal).FIELD(VarlenAttnParams, bias_mode)
      .FIELD(VarlenAttnParams, max_distance).FIELD(VarlenAttnParams, num_buckets).FIELD(VarlenAttnParams, bidirectional)
      .DTYPE_FIELD(VarlenAttnParams);
  m.def("varlen_attention_fwd", [](const VarlenAttnParams& p, int64_t stream) {
    require_device("varlen_attention_fwd");
    raise_if(launch_varlen_attention(p, stream), "varlen_attention_fwd");
  }, py::arg("params"), py::arg("stream"), "short-sequence varlen attention forward (fp16/bf16, head_dim 64/128).");

  py::class_<DecodeParams>(m, "DecodeParams")
      .def(py::init([]() { DecodeParams p{}; return p; }))
      .PTR_FIELD(DecodeParams, q).PTR_FIELD(DecodeParams, k_cache).PTR_FIELD(DecodeParams, v_cache)
      .PTR_FIELD(DecodeParams, out).PTR_FIELD(DecodeParams, lse).PTR_FIELD(DecodeParams, seqlens_k)
      .PTR_FIELD(DecodeParams, block_table).PTR_FIELD(DecodeParams, alibi_slopes).PTR_FIELD(DecodeParams, inv_freq)
      .PTR_FIELD(DecodeParams, cta_starts).PTR_FIELD(DecodeParams, tile_offsets).PTR_FIELD(DecodeParams, tile_batch)
      .PTR_FIELD(DecodeParams, tile_head).PTR_FIELD(DecodeParams, tile_mblock).PTR_FIELD(DecodeParams, host_cta)
      .PTR_FIELD(DecodeParams, num_splits)
      .PTR_FIELD(DecodeParams, ws_m).PTR_FIELD(DecodeParams, ws_l).PTR_FIELD(DecodeParams, ws_o)
      .PTR_FIELD(DecodeParams, flags).FIELD(DecodeParams, epoch)
      .FIELD(DecodeParams, q_stride_b).FIELD(DecodeParams, q_stride_s).FIELD(DecodeParams, q_stride_h)
      .FIELD(DecodeParams, k_stride_b).FIELD(DecodeParams, k_stride_s).FIELD(DecodeParams, k_stride_h)
      .FIELD(DecodeParams, v_stride_b).FIELD(DecodeParams, v_stride_s).FIELD(DecodeParams, v_stride_h)
      .FIELD(DecodeParams, out_stride_b).FIELD(DecodeParams, out_stride_s).FIELD(DecodeParams, out_stride_h)
      .FIELD(DecodeParams, lse_stride_b).FIELD(DecodeParams, lse_stride_h)
      .FIELD(DecodeParams, block_table_stride_b).FIELD(DecodeParams, alibi_stride_b)
      .FIELD(DecodeParams, batch_size).FIELD(DecodeParams, seqlen_q).FIELD(DecodeParams, num_heads)
      .FIELD(DecodeParams, num_heads_k).FIELD(DecodeParams, head_dim).FIELD(DecodeParams, page_block_size)
      .FIELD(DecodeParams, num_ctas).FIELD(DecodeParams, num_out_tiles).FIELD(DecodeParams, rotary_dim)
      .FIELD(DecodeParams, rotary_interleaved).FIELD(DecodeParams, softmax_scale).FIELD(DecodeParams, causal)
      .DTYPE_FIELD(DecodeParams);
  m.def("lean_decode", [](const DecodeParams& p, int64_t stream) {
    require_device("lean_decode");
    raise_if(launch_lean_decode(p, stream), "lean_decode");
  }, py::arg("params"), py::arg("stream"), "LeanAttention stream-K decode (fp16/bf16, head_dim 64/128/256).");
  m.def("lean_decode_tile_sizes", [](int head_dim) {
    int bm = 0, bn = 0;
    lean_decode_tile_sizes(head_dim, &bm, &bn);
    return py::make_tuple(bm, bn);
  }, py::arg("head_dim"), "(block_m, block_n) the schedule must use for this head_dim (no device needed).");
  m.def("lean_decode_max_ctas", [](int head_dim, const std::string& dtype) {
    require_device("lean_decode_max_ctas");
    std::string err;
    const int n = lean_decode_max_ctas(head_dim, dtype_from(dtype), &err);
    raise_if(err, "lean_decode_max_ctas");
    return n;
  }, py::arg("head_dim"), py::arg("dtype"), "Most CTAs that can be co-resident on the current device.");

  py::class_<EcoParams>(m, "EcoParams")
      .def(py::init([]() { EcoParams p{}; return p; }))
      .PTR_FIELD(EcoParams, q_codes).PTR_FIELD(EcoParams, k_codes).PTR_FIELD(EcoParams, v).PTR_FIELD(EcoParams, out)
      .PTR_FIELD(EcoParams, kv_lens).PTR_FIELD(EcoParams, ws_m).PTR_FIELD(EcoParams, ws_s)
      .FIELD(EcoParams, q_stride_bh).FIELD(EcoParams, q_stride_s).FIELD(EcoParams, k_stride_bh).FIELD(EcoParams, k_stride_s)
      .FIELD(EcoParams, v_stride_bh).FIELD(EcoParams, v_stride_s).FIELD(EcoParams, out_stride_bh).FIELD(EcoParams, out_stride_s)
      .FIELD(EcoParams, batch_heads).FIELD(EcoParams, num_heads).FIELD(EcoParams, seqlen_q).FIELD(EcoParams, seqlen_k)
      .FIELD(EcoParams, head_dim_v).FIELD(EcoParams, nbits).FIELD(EcoParams, repo_form).DTYPE_FIELD(EcoParams);
  m.def("ecoformer_pairwise", [](const EcoParams& p, int64_t stream) {
    require_device("ecoformer_pairwise");
    raise_if(launch_ecoformer_pairwise(p, stream), "ecoformer_pairwise");
  }, py::arg("params"), py::arg("stream"));
  m.def("ecoformer_linear", [](const EcoParams& p, int64_t stream) {
    require_device("ecoformer_linear");
    raise_if(launch_ecoformer_linear(p, stream), "ecoformer_linear");
  }, py::arg("params"), py::arg("stream"));
}
