"""The backend registration: ``import ulysses_attn`` makes ``attn_implementation="ulysses_flash"``
a name transformers knows, for new models and for switching an existing one."""

from __future__ import annotations

from tiny_models import CONFIGS
from transformers import AutoModelForCausalLM
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import ulysses_attn  # noqa: F401  (registers the backend)
from ulysses_attn.attention import ulysses_flash_attention, ulysses_flash_mask


def test_from_config_registers_backend():
    model = AutoModelForCausalLM.from_config(CONFIGS["llama"](), attn_implementation="ulysses_flash")
    assert model.config._attn_implementation == "ulysses_flash"
    assert ALL_ATTENTION_FUNCTIONS["ulysses_flash"] is ulysses_flash_attention
    assert ALL_MASK_ATTENTION_FUNCTIONS["ulysses_flash"] is ulysses_flash_mask
    sdpa = AutoModelForCausalLM.from_config(CONFIGS["llama"](), attn_implementation="sdpa")
    sdpa.set_attn_implementation("ulysses_flash")  # switching an existing model works too
    assert sdpa.config._attn_implementation == "ulysses_flash"
