#!/usr/bin/env bash
# Prepare FlashAttention-4 for the GPU machine, whose calls carry at most 64 MiB: run here, in the
# repository root, after `FA4=1 bash ../shared/gpu/wheels.sh` (which fills .whl/ with the small
# FA4 wheels). The 92 MB nvidia-cutlass-dsl-libs-cu13 wheel is unpacked, xz-compressed (64 MB) and
# split into two git-ignored folders that travel in two calls:
#   .fa4a/ part 1 + transformers;  .fa4b/ part 2 + the small FA4 wheels + checksum.
# On the GPU machine, call 1 (carry .fa4a): `mkdir -p /tmp/fa4a && cp .fa4a/* /tmp/fa4a/`;
# call 2 at once (carry .fa4b .whl; the machine stays warm 30 s): `bash benchmarks/fa4_install.sh`.
set -euo pipefail
mkdir -p .fa4a .fa4b
grep -qx '/.fa4\*/' .git/info/exclude 2>/dev/null || echo '/.fa4*/' >> .git/info/exclude
tmp=$(mktemp -d)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 -d "$tmp" nvidia-cutlass-dsl-libs-cu13==4.8.1
(cd "$tmp" && mkdir x && cd x && unzip -q ../nvidia_cutlass_dsl_libs_cu13-*.whl && tar cf - . | xz -9 -T0 > ../cu13.tar.xz)
(cd "$tmp" && split -b 30000000 cu13.tar.xz cu13.tar.xz.part- && sha256sum cu13.tar.xz > cu13.sha256)  # checked in /tmp
mv "$tmp"/cu13.tar.xz.part-aa .fa4a/
mv "$tmp"/cu13.tar.xz.part-a[b-z] "$tmp"/cu13.sha256 .fa4b/
cp .whl/transformers-*.whl .fa4a/
mv .whl/flash_attn_4-* .whl/nvidia_cutlass_dsl* .whl/quack_kernels-* .whl/apache_tvm_ffi-* .whl/torch_c_dlpack_ext-* .fa4b/
rm -rf "$tmp"
du -sh .whl .fa4a .fa4b
