#!/usr/bin/env bash
# A virtual environment with LLaMA-Factory 0.9.5 and its pins beside this package, for
# tests/test_llamafactory.py (which builds it on first use) and docs/llamafactory.md:
#     bash tests/llamafactory_venv.sh [folder]      # default: .venv-lf
# LLaMA-Factory pins transformers <= 5.6 and trl <= 0.24, and trl 0.24's DPOTrainer imports only
# with transformers < 5.3, hence 5.2.0. LLaMA-Factory itself goes in without its dependencies: they
# include gradio, modelscope and the index's torchvision / torchaudio, CUDA builds that break
# `import transformers` on a CPU machine; training needs only those listed here.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv-lf}
TORCH=${TORCH_VERSION:-2.13.0}
python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "torch==$TORCH"
"$VENV/bin/python" -m pip install -q "torch==$TORCH" transformers==5.2.0 trl==0.24.0 peft==0.18.1 \
    accelerate==1.11.0 datasets==4.0.0 deepspeed==0.19.8 "torchdata>=0.10,<=0.11" "tyro<0.9.0" \
    omegaconf fire einops pyyaml sentencepiece tiktoken pydantic protobuf scipy pandas matplotlib \
    pytest pytest-timeout
"$VENV/bin/python" -m pip install -q --no-deps llamafactory==0.9.5
"$VENV/bin/python" -m pip install -q --no-deps -e .
"$VENV/bin/python" -c "import llamafactory, ulysses_attn, transformers; print('LLaMA-Factory', llamafactory.__version__, 'transformers', transformers.__version__)"
