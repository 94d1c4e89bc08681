// The CUDA kernels (ghost_cuda.cu) and their host code (ghost_cuda_host.cpp), compiled for the CPU
// emulator in tests/cuda_emu/cuda_emu.h; built on demand by tests/test_cuda_emu.py.
#define GHOST_CUDA_EMULATE 1

#include <torch/extension.h>

#include "../../ghost_ext/csrc/cuda/ghost_cuda.cu"
#include "../../ghost_ext/csrc/cuda/ghost_cuda_host.cpp"

// The launch configuration the host code picks for x (N, C, H, W), kernel size k and out_channels.
pybind11::dict launch_config(const at::Tensor& x, int64_t k, int64_t out_channels) {
  const auto fmt = ghost::out_format(x);
  const at::Tensor out = at::empty({x.size(0), out_channels, x.size(2), x.size(3)}, x.options().memory_format(fmt));
  const ghost::Geom g = ghost::make_geom(x.contiguous(fmt), out, static_cast<int>(k), out_channels);
  const ghost::LaunchCfg c = ghost::launch_cfg(g, fmt, ghost::acc_type(x));
  pybind11::dict d;
  d["tiled"] = c.tiled;
  d["fused"] = c.fused;
  d["th"] = c.th;
  d["tp"] = c.tp;
  d["bands"] = c.bands;
  d["G"] = c.G;
  d["smem_fwd"] = c.smem_fwd;
  d["smem_bwd"] = c.smem_bwd;
  return d;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("launch_config", &launch_config, "make_cfg's choice for a tensor");
  m.def("set_fused_max_tiles", [](int64_t v) { ghost::fused_max_tiles() = v; },
        "the most tiles per channel for the fused (in-kernel merge) path; 0 turns it off");
  m.def("get_fused_max_tiles", [] { return ghost::fused_max_tiles(); });
  m.def("forward", &ghost::ghost_concat_cuda, "ghost_concat on the emulated GPU (CPU tensors)");
  m.def("backward", &ghost::ghost_concat_backward_cuda, "ghost_concat_backward on the emulated GPU");
}
