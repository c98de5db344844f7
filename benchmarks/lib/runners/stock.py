"""``sdpa``, ``flash_attention_2/3/4``: a stock HF backend without sequence parallelism; every GPU
trains its own full-length sample (P = 1). ``--long-sequence``: ours without the chunked loss."""

from __future__ import annotations

from .base import Runner


class StockRunner(Runner):
    def __init__(self, backend: str) -> None:
        super().__init__(backend, backend, 1, None)
