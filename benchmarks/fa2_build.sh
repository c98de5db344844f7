#!/usr/bin/env bash
# Build FlashAttention 2 for the GPU machine (H100/H200, torch 2.11.0+cu130, Python 3.12), which
# has no network, no flash-attn and no wheel of it on PyPI for that torch. Run here, in the
# repository root, on a machine with CUDA 13's nvcc and g++ (the CPU machine has both; ~20 min on
# 2 cores). A normal `pip install flash-attn` on a machine with network needs none of this.
#
# A scratch build, for the GPU checks and benchmarks only: flash-attn 2.8.3.post2 from its PyPI
# sdist, sm_90 only, bf16 only, head dims 32 / 64 / 128 (other dtypes and head dims raise), no
# ALiBi. Its pybind11 module is replaced by a TORCH_LIBRARY registration of the same four functions
# (fwd, varlen_fwd, bwd, varlen_bwd) and a small Python module that loads it, so the library does
# not depend on the Python version (this machine has 3.11, the GPU machine 3.12). flash_attn's own
# Python interface is used unchanged.
#
# Result: .fa2/site (git-ignored, ~37 MB), to copy into a folder on PYTHONPATH on the GPU machine:
# carry .fa2, then `cp -r .fa2/site/* /tmp/site/` (docs/benchmarks.md, "FlashAttention 2").
set -euo pipefail
ROOT=$PWD
W=${FA2_WORK:-/tmp/fa2_build}
mkdir -p "$W/obj" .fa2/site
grep -qx '/.fa2/' .git/info/exclude 2>/dev/null || echo '/.fa2/' >> .git/info/exclude
cd "$W"
test -f torch/include/torch/library.h || {
  python3 -m pip download -q --no-deps -d . torch==2.11.0
  unzip -q -o torch-2.11.0-*.whl 'torch/include/*' 'torch/lib/*'
}
SRC=$W/flash_attn-2.8.3.post2
test -d "$SRC" || {
  read -r url sha < <(curl -s https://pypi.org/pypi/flash-attn/json | python3 -c "import json, sys, urllib.parse
u = next(u for u in json.load(sys.stdin)['releases']['2.8.3.post2'] if u['packagetype'] == 'sdist')
print(urllib.parse.urljoin('https://pypi.org/pypi/flash-attn/json', u['url']), u['digests']['sha256'])")
  curl -sL -o fa2.tar.gz "$url"
  echo "$sha  fa2.tar.gz" | sha256sum -c -
  tar xzf fa2.tar.gz
  python3 - "$SRC/csrc/flash_attn" <<'PY'
import sys
d = sys.argv[1]
p = f"{d}/src/static_switch.h"
s = open(p).read()
i, j = s.index("#define FP16_SWITCH"), s.index("}()", s.index("#define HEADDIM_SWITCH")) + 3
s = s[:i] + r'''#define FP16_SWITCH(COND, ...)                                             \
  [&] {                                                                    \
    TORCH_CHECK(!(COND), "this FlashAttention build has bf16 only");       \
    using elem_type = cutlass::bfloat16_t;                                 \
    return __VA_ARGS__();                                                  \
  }()

#define HEADDIM_SWITCH(HEADDIM, ...)                                       \
  [&] {                                                                    \
    TORCH_CHECK(HEADDIM == 32 || HEADDIM == 64 || HEADDIM == 128,          \
                "this FlashAttention build has head dims 32, 64, 128 only"); \
    if (HEADDIM == 32) {                                                   \
      constexpr static int kHeadDim = 32;                                  \
      return __VA_ARGS__();                                                \
    } else if (HEADDIM == 64) {                                            \
      constexpr static int kHeadDim = 64;                                  \
      return __VA_ARGS__();                                                \
    } else {                                                               \
      constexpr static int kHeadDim = 128;                                 \
      return __VA_ARGS__();                                                \
    }                                                                      \
  }()''' + s[j:]
open(p, "w").write(s)
p = f"{d}/flash_api.cpp"
s = open(p).read().replace("#include <torch/python.h>\n", "#include <torch/all.h>\n#include <torch/library.h>\n")
s = s[: s.index("PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {")] + r'''namespace {
using OptT = std::optional<at::Tensor>;
using OptG = std::optional<at::Generator>;
// the op schema takes double / int64_t where the functions take float / int
std::vector<at::Tensor> op_fwd(at::Tensor q, at::Tensor k, at::Tensor v, OptT out, OptT alibi, double p, double scale,
                               bool causal, int64_t wl, int64_t wr, double softcap, bool ret, OptG gen) {
    return FLASH_NAMESPACE::mha_fwd(q, k, v, out, alibi, p, scale, causal, wl, wr, softcap, ret, gen);
}
std::vector<at::Tensor> op_varlen_fwd(at::Tensor q, at::Tensor k, at::Tensor v, OptT out, at::Tensor cu_q,
                                      at::Tensor cu_k, OptT seqused_k, OptT leftpad_k, OptT block_table, OptT alibi,
                                      int64_t max_q, int64_t max_k, double p, double scale, bool zero_tensors,
                                      bool causal, int64_t wl, int64_t wr, double softcap, bool ret, OptG gen) {
    std::optional<const at::Tensor> leftpad = leftpad_k;
    return FLASH_NAMESPACE::mha_varlen_fwd(q, k, v, out, cu_q, cu_k, seqused_k, leftpad, block_table, alibi, max_q,
                                           max_k, p, scale, zero_tensors, causal, wl, wr, softcap, ret, gen);
}
std::vector<at::Tensor> op_bwd(at::Tensor dout, at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor out,
                               at::Tensor lse, OptT dq, OptT dk, OptT dv, OptT alibi, double p, double scale,
                               bool causal, int64_t wl, int64_t wr, double softcap, bool deterministic, OptG gen,
                               OptT rng_state) {
    return FLASH_NAMESPACE::mha_bwd(dout, q, k, v, out, lse, dq, dk, dv, alibi, p, scale, causal, wl, wr, softcap,
                                    deterministic, gen, rng_state);
}
std::vector<at::Tensor> op_varlen_bwd(at::Tensor dout, at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor out,
                                      at::Tensor lse, OptT dq, OptT dk, OptT dv, at::Tensor cu_q, at::Tensor cu_k,
                                      OptT alibi, int64_t max_q, int64_t max_k, double p, double scale,
                                      bool zero_tensors, bool causal, int64_t wl, int64_t wr, double softcap,
                                      bool deterministic, OptG gen, OptT rng_state) {
    return FLASH_NAMESPACE::mha_varlen_bwd(dout, q, k, v, out, lse, dq, dk, dv, cu_q, cu_k, alibi, max_q, max_k, p,
                                           scale, zero_tensors, causal, wl, wr, softcap, deterministic, gen,
                                           rng_state);
}
}  // namespace

TORCH_LIBRARY(flash_attn_2_cuda, m) {
    m.def("fwd", &op_fwd);
    m.def("varlen_fwd", &op_varlen_fwd);
    m.def("bwd", &op_bwd);
    m.def("varlen_bwd", &op_varlen_bwd);
}
'''
open(p, "w").write(s)
PY
}
T=$W/torch/include
INC="-I$SRC/csrc/flash_attn -I$SRC/csrc/flash_attn/src -I$SRC/csrc/cutlass/include -I$T -I$T/torch/csrc/api/include -I/usr/local/cuda/include"
DEF="-DFLASHATTENTION_DISABLE_ALIBI -D_GLIBCXX_USE_CXX11_ABI=1"
NVCC="-O3 -std=c++17 -U__CUDA_NO_HALF_OPERATORS__ -U__CUDA_NO_HALF_CONVERSIONS__ -U__CUDA_NO_HALF2_OPERATORS__
      -U__CUDA_NO_BFLOAT16_CONVERSIONS__ --expt-relaxed-constexpr --expt-extended-lambda --use_fast_math
      -gencode arch=compute_90,code=sm_90 -Xcompiler -fPIC"
export INC DEF NVCC W
g++ -c "$SRC/csrc/flash_attn/flash_api.cpp" -o obj/flash_api.o -O3 -std=c++17 -fPIC $INC $DEF
ls "$SRC"/csrc/flash_attn/src/flash_{fwd,bwd,fwd_split}_hdim{32,64,128}_bf16{,_causal}_sm80.cu |
  xargs -P "$(nproc)" -I{} bash -c 'o=$W/obj/$(basename {}).o; test -f $o || nvcc -c {} -o $o $NVCC $INC $DEF'
g++ -shared -o obj/libflash_attn_2_cuda.so obj/*.o -L"$W/torch/lib" -lc10 -lc10_cuda -ltorch -ltorch_cpu -ltorch_cuda \
  -L/usr/local/cuda/lib64 -lcudart
cd "$ROOT"
S=.fa2/site
mkdir -p $S/flash_attn $S/flash_attn-2.8.3.post2.dist-info
cp "$W/obj/libflash_attn_2_cuda.so" $S/
cp "$SRC"/flash_attn/{__init__,flash_attn_interface,bert_padding}.py $S/flash_attn/
printf 'Metadata-Version: 2.1\nName: flash-attn\nVersion: 2.8.3.post2\n' > $S/flash_attn-2.8.3.post2.dist-info/METADATA
printf 'flash_attn\nflash_attn_2_cuda\n' > $S/flash_attn-2.8.3.post2.dist-info/top_level.txt
touch $S/flash_attn-2.8.3.post2.dist-info/RECORD
cat > $S/flash_attn_2_cuda.py <<'PY'
"""FlashAttention 2's CUDA functions from benchmarks/fa2_build.sh's library (ops, not pybind11)."""
import os

import torch

torch.ops.load_library(os.path.join(os.path.dirname(os.path.abspath(__file__)), "libflash_attn_2_cuda.so"))
fwd, varlen_fwd, bwd, varlen_bwd = (getattr(torch.ops.flash_attn_2_cuda, n) for n in ("fwd", "varlen_fwd", "bwd", "varlen_bwd"))
PY
du -sh .fa2
