#!/usr/bin/env bash
# GPU machine: reassemble and install FlashAttention-4 into /tmp/site (see fa4_wheels.sh), with the
# wheels of .whl/. Then: export PYTHONPATH=$PWD:/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages
# (pip --target does not run the .pth file that adds dsl_packages to sys.path).
set -euo pipefail
test -f /tmp/fa4a/cu13.tar.xz.part-aa || { echo "part 1 missing: copy .fa4a/ to /tmp/fa4a in the call before" >&2; exit 3; }
cat /tmp/fa4a/cu13.tar.xz.part-aa .fa4b/cu13.tar.xz.part-a[b-z] > /tmp/cu13.tar.xz
(cd /tmp && sha256sum -c "$OLDPWD/.fa4b/cu13.sha256")
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl .fa4b/*.whl
tar xJf /tmp/cu13.tar.xz -C /tmp/site
PYTHONPATH=$PWD:/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages python3 -c \
  "import torch; from ulysses_attn import kernels; print('flash_attn:', kernels.flash_version(torch.device('cuda')))"
