"""Offload activation-checkpoint inputs to pinned CPU memory, overlapped with compute.

With activation checkpointing each decoder layer keeps only its input hidden states for the
recompute -- ``layers x tokens x hidden`` bytes, the largest activation left at long sequence
lengths (32 GiB for Llama-3.1-8B at 128K tokens per rank in bf16). :class:`CheckpointOffloader`
is a ``saved_tensors_hooks`` pair: wrapped around a forward in which the layers are checkpointed,
it receives exactly those inputs (inside a checkpointed layer, the checkpoint's own hooks take
precedence) and

* copies each one to pinned host memory on a side CUDA stream, so the copy overlaps the next
  layers' compute (the caching allocator is told, with ``record_stream``, not to reuse the device
  memory before the copy is done);
* in the backward, when a layer's input is unpacked for its recompute, starts the host-to-device
  copy of the layer before it, so that copy overlaps this layer's backward.

transformers' own ``activation_checkpointing_kwargs={"offload": True}`` uses
``torch.autograd.graph.save_on_cpu``, whose copies run on the compute stream and stall it.
Tensors smaller than ``min_bytes`` are kept as they are; on a CPU-only run the same bookkeeping
runs without copies (there is nowhere cheaper to put them).
"""

from __future__ import annotations

import torch

__all__ = ["CheckpointOffloader"]


class _Offloaded:
    __slots__ = ("index", "device", "host", "device_copy", "ready")

    def __init__(self, index: int, device: torch.device, host: torch.Tensor, ready):
        self.index, self.device, self.host, self.ready = index, device, host, ready
        self.device_copy = None


class CheckpointOffloader(torch.autograd.graph.saved_tensors_hooks):
    """``with CheckpointOffloader(): loss = model(**batch).loss`` (layers checkpointed), then
    ``loss.backward()`` outside the ``with``. One instance per model; it can be re-entered each step.

    ``offloaded_bytes`` counts what the last forward moved to the host.
    """

    def __init__(self, min_bytes: int = 1 << 20):
        self.min_bytes = min_bytes
        self._stream = None
        self._records: list[_Offloaded] = []
        self.offloaded_bytes = 0
        super().__init__(self._pack, self._unpack)

    def __enter__(self):
        self._records, self.offloaded_bytes = [], 0
        return super().__enter__()

    def _side_stream(self, device: torch.device):
        if self._stream is None:
            self._stream = torch.cuda.Stream(device)
        return self._stream

    def _pack(self, tensor: torch.Tensor):
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes < self.min_bytes:
            return tensor
        self.offloaded_bytes += nbytes
        if tensor.device.type != "cuda":
            # nowhere cheaper to go; kept as is so the same bookkeeping runs (and is tested) on CPU
            record = _Offloaded(len(self._records), tensor.device, tensor, None)
        else:
            stream = self._side_stream(tensor.device)
            stream.wait_stream(torch.cuda.current_stream(tensor.device))
            with torch.cuda.stream(stream):
                host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
                host.copy_(tensor, non_blocking=True)
                tensor.record_stream(stream)
                ready = torch.cuda.Event()
                ready.record(stream)
            record = _Offloaded(len(self._records), tensor.device, host, ready)
        self._records.append(record)
        return record

    def _fetch(self, record: _Offloaded) -> None:
        if record.device_copy is not None:
            return
        if record.device.type != "cuda":
            record.device_copy = record.host
            return
        stream = self._side_stream(record.device)
        with torch.cuda.stream(stream):
            stream.wait_event(record.ready)  # its device-to-host copy is done
            record.device_copy = record.host.to(record.device, non_blocking=True)
            record.ready = torch.cuda.Event()
            record.ready.record(stream)

    def _unpack(self, packed):
        if not isinstance(packed, _Offloaded):
            return packed
        self._fetch(packed)
        # the backward reaches the checkpointed layers in reverse order: start copying the next one
        previous = self._records[packed.index - 1] if packed.index > 0 else None
        if previous is not None:
            self._fetch(previous)
        tensor, packed.device_copy = packed.device_copy, None
        self._records[packed.index] = None
        if packed.device.type == "cuda":
            current = torch.cuda.current_stream(packed.device)
            current.wait_event(packed.ready)
            tensor.record_stream(current)
        return tensor
