"""Test-only: what the LLaMA-Factory test runs record (tests/test_llamafactory.py).

The LLaMA-Factory processes get this folder on PYTHONPATH (with the torchaudio stand-in beside
it). When ``ULYSSES_TEST_RECORD`` names a folder, every process records the sequence length each
decoder layer receives (the first layer of each forward; found by a global module hook that then
removes itself), except in forwards the package runs unsharded by design (its one-time probe of
the LM head's logit transform, generation), and writes it to ``<folder>/rank<RANK>.json`` at exit:
the proof that the layers saw S/P tokens.
"""

import atexit
import json
import os

_FOLDER = os.environ.get("ULYSSES_TEST_RECORD")

if _FOLDER and os.environ.get("RANK") is not None:
    import sys

    import torch

    _lengths: list[int] = []

    def _unsharded() -> bool:
        state = sys.modules.get("ulysses_attn.state")
        return bool(state is not None and state.STATE.unsharded)

    def _record(module, args):
        if args and torch.is_tensor(args[0]) and not _unsharded():  # transformers passes hidden_states positionally
            _lengths.append(int(args[0].shape[1]))

    def _find_first_layer(module, args):
        # a global hook until the first decoder layer runs, then a hook on that layer alone: the
        # package's LM-head paths step aside while global module hooks exist (they may need the call)
        if type(module).__name__.endswith("DecoderLayer"):
            if getattr(getattr(module, "self_attn", None), "layer_idx", None) == 0:
                _finder.remove()
                module.register_forward_pre_hook(_record)
                _record(module, args)

    _finder = torch.nn.modules.module.register_module_forward_pre_hook(_find_first_layer)

    def _write() -> None:
        os.makedirs(_FOLDER, exist_ok=True)
        with open(os.path.join(_FOLDER, f"rank{os.environ['RANK']}.json"), "w") as f:
            json.dump(_lengths, f)

    atexit.register(_write)
