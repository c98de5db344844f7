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
  copy of the layer before it, so that copy overlaps this layer's backward;
* keeps on the device what is saved after the last decoder layer (:meth:`keep_rest` -- the final
  norm's tensors, the first the backward needs: offloading them would stall its start) and copies
  a tensor saved by several layers (the rotary cos/sin) once.

With ``offload_kept=True`` it also takes what selective checkpointing keeps of each layer (the
attention kernels' outputs, :mod:`ulysses_attn.selective_checkpoint`) through :meth:`stash` and
:meth:`restore`, in the same record order, so each restore prefetches the record before it.

transformers' own ``activation_checkpointing_kwargs={"offload": True}`` uses
``torch.autograd.graph.save_on_cpu``, whose copies run on the compute stream and stall it.
Tensors smaller than ``min_bytes`` are kept as they are; on a CPU-only run the same bookkeeping
runs without copies (there is nowhere cheaper to put them).
"""

from __future__ import annotations

import contextvars
import weakref
from typing import Any

import torch

__all__ = ["CheckpointOffloader", "active_offloader"]

_active: contextvars.ContextVar[CheckpointOffloader | None] = contextvars.ContextVar("ulysses_offloader", default=None)


def active_offloader() -> CheckpointOffloader | None:
    """The offloader of the forward running now (inside its ``with``), or ``None``."""
    return _active.get()


class _Offloaded:
    # ``records``: the list of the forward that saved it (a second forward before this one's
    # backward starts a new list), ``index``: its place there
    __slots__ = ("records", "index", "device", "host", "device_copy", "ready", "uses")

    def __init__(self, records: list, device: torch.device, host: torch.Tensor, ready: Any):
        self.records, self.index = records, len(records)
        self.device, self.host, self.ready = device, host, ready
        records.append(self)
        self.device_copy: torch.Tensor | None = None
        self.uses = 1


class CheckpointOffloader(torch.autograd.graph.saved_tensors_hooks):
    """``with CheckpointOffloader(): loss = model(**batch).loss`` (layers checkpointed), then
    ``loss.backward()`` outside the ``with``. One instance per model; it can be re-entered each step.

    ``offloaded_bytes`` counts what the last forward moved to the host.
    """

    def __init__(self, min_bytes: int = 1 << 20, offload_kept: bool = False):
        self.min_bytes, self.offload_kept = min_bytes, offload_kept
        self._stream: torch.cuda.Stream | None = None
        self._records: list[_Offloaded | None] = []
        self._seen: dict[int, tuple[weakref.ref, _Offloaded]] = {}
        self._keeping = False
        self.offloaded_bytes = 0
        super().__init__(self._pack, self._unpack)

    def __enter__(self):
        self._records, self._seen, self._keeping, self.offloaded_bytes = [], {}, False, 0
        self._token = _active.set(self)
        return super().__enter__()

    def __exit__(self, *exc):
        self._seen = {}  # the storages may be reused once the forward is over
        _active.reset(self._token)
        return super().__exit__(*exc)

    def keep_rest(self) -> None:
        """Keep every tensor saved from now until the end of this forward on the device."""
        self._keeping = True

    def _side_stream(self, device: torch.device):
        if self._stream is None:
            self._stream = torch.cuda.Stream(device)
        return self._stream

    def stash(self, tensor: torch.Tensor):
        """Offload a tensor kept outside autograd's saved tensors; :meth:`restore` gives it back (once)."""
        return tensor if self._stays(tensor) else self._offload(tensor)

    def restore(self, packed) -> torch.Tensor:
        return self._unpack(packed)

    def _stays(self, tensor: torch.Tensor) -> bool:
        return tensor.numel() * tensor.element_size() < self.min_bytes or self._keeping

    def _pack(self, tensor: torch.Tensor):
        if self._stays(tensor):
            return tensor
        source, record = self._seen.get(id(tensor), (None, None))
        if source is not None and record is not None and source() is tensor:  # saved again, by another layer
            record.uses += 1
            return record
        record = self._offload(tensor)
        self._seen[id(tensor)] = (weakref.ref(tensor), record)
        return record

    def _offload(self, tensor: torch.Tensor) -> _Offloaded:
        self.offloaded_bytes += tensor.numel() * tensor.element_size()
        if tensor.device.type != "cuda":
            # nowhere cheaper to go; kept as is so the same bookkeeping runs (and is tested) on CPU
            record = _Offloaded(self._records, tensor.device, tensor, None)
        else:
            stream = self._side_stream(tensor.device)
            stream.wait_stream(torch.cuda.current_stream(tensor.device))
            with torch.cuda.stream(stream):
                # the same strides: a kernel's backward may rely on its saved output's layout (cuDNN
                # attention took a contiguous copy of its permuted output as wrong gradients)
                host = torch.empty_like(tensor, device="cpu", pin_memory=True)
                host.copy_(tensor, non_blocking=True)
                tensor.record_stream(stream)
                ready = torch.cuda.Event()
                ready.record(stream)
            record = _Offloaded(self._records, tensor.device, host, ready)
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
            record.device_copy = record.host.to(record.device, non_blocking=True)  # strides kept
            record.ready = torch.cuda.Event()
            record.ready.record(stream)

    def _prefetch_before(self, record: _Offloaded) -> None:
        """The backward reaches the checkpointed layers in reverse order: start copying the
        closest earlier record of the same forward that is still on the host."""
        for j in range(record.index - 1, -1, -1):
            earlier = record.records[j]
            if earlier is not None and earlier.device_copy is None:
                self._fetch(earlier)
                return

    def _unpack(self, packed):
        if not isinstance(packed, _Offloaded):
            return packed
        self._fetch(packed)
        self._prefetch_before(packed)
        tensor = packed.device_copy
        assert tensor is not None  # _fetch made it
        packed.uses -= 1
        if packed.uses == 0:  # the last layer that saved it has unpacked it
            packed.device_copy = None
            packed.records[packed.index] = None
        if packed.device.type == "cuda":
            current = torch.cuda.current_stream(packed.device)
            current.wait_event(packed.ready)
            tensor.record_stream(current)
        return tensor
