"""Transparent sequence parallelism: the whole batch in, the whole outputs out, any loss exact.

In the sharded path the collator hands each rank ``S/P`` tokens and the loss must be one the
package makes SP-aware. Transparent mode instead gives every rank of an SP group the whole
(padded) batch and shards *inside* the model: the backbone's forward (``model.base_model``) is
wrapped so that it

1. shards its inputs along the sequence (:func:`~ulysses_attn.data.shard_batch`: pad to a multiple
   of P, global ``position_ids``, packed documents as ``cu_seq_lens``),
2. runs the embedding and the decoder layers on this rank's ``S/P`` tokens (the attention's
   all-to-alls as in the sharded path),
3. all-gathers the per-token outputs (``last_hidden_state``, ``hidden_states``, MoE
   ``router_logits``) and cuts the padding,

so the final norm's output, the head, ``outputs.logits`` and any loss computed from them equal the
model's without SP, on every rank. The gather's backward sums the ranks' gradients
(:func:`~ulysses_attn.comm.all_gather_seq`): with every rank of a group holding the same loss, the
data-parallel mean over all ranks (DDP, ZeRO) is exactly the non-SP gradient, parameters before and
after the gather alike.

Memory: every rank holds the full-sequence hidden states after the backbone and the full logits
(``[B, S, vocab]``), as a run without SP does; the decoder layers' activations are ``1/P``.

A forward with a KV cache (``cache`` / ``past_key_values``: generation, prefill included) runs
unsharded on each rank (:func:`unsharded`).

A loss that is a sum over tokens can skip the gather and the full logits: inside
:func:`sharded_hidden_states` the backbone leaves ``last_hidden_state`` sharded and hands it, with
its input shard, to the caller, which scores its ``S/P`` tokens and sums over the group
(:func:`~ulysses_attn.loss.sp_sum`); ``integrations/llamafactory.py`` does this for DPO log-probs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
from collections.abc import Callable, Iterator
from typing import Any

import torch

from . import patches
from .comm import all_gather_seq
from .data import shard_batch
from .groups import SequenceParallel
from .state import STATE

__all__ = ["make_transparent", "is_transparent", "unsharded", "sharded_hidden_states", "ShardedOutput"]

_RECORD = "transformers.PreTrainedModel.base_model.forward.transparent"
_CACHE_ARGUMENTS = ("cache", "past_key_values")


@contextlib.contextmanager
def unsharded() -> Iterator[None]:
    """Run the models of this process as without SP (the attention attends over its input as
    given, no collectives) inside the block: generation, cached forwards."""
    STATE.unsharded += 1
    try:
        yield
    finally:
        STATE.unsharded -= 1


@dataclasses.dataclass
class ShardedOutput:
    """What a transparent backbone's forward left sharded in a :func:`sharded_hidden_states` block."""

    score: Callable[[torch.Tensor, dict[str, Any], int], Any] | None = None
    hidden: torch.Tensor | None = None  # this rank's last_hidden_state, [B, ceil(S/P), H]
    batch: dict[str, Any] | None = None  # this rank's shard of the backbone's inputs (shard_batch)
    seq: int = 0  # the full sequence length S
    scored: Any = None  # what score(hidden, batch, seq) returned


@contextlib.contextmanager
def sharded_hidden_states(score: Callable[[torch.Tensor, dict[str, Any], int], Any] | None = None):
    """Inside the block, the next forward of a transparent backbone keeps its per-token outputs
    sharded: ``last_hidden_state`` holds this rank's ``S/P`` tokens only (the model's head, if it
    runs, sees those), and the returned :class:`ShardedOutput` gets them with the input shard.
    ``score(hidden, shard, seq)``, if given, runs right there, inside the model's forward (where
    DeepSpeed ZeRO-3 expects modules such as the LM head to be called), into ``scored``.

    >>> with sharded_hidden_states(lambda h, shard, seq: my_scores(h, model.lm_head)) as out:
    ...     model(input_ids=ids, attention_mask=mask, logits_to_keep=torch.empty(0, dtype=torch.long))
    >>> total = loss.sp_sum(out.scored)
    """
    if STATE.capture is not None:
        raise RuntimeError("sharded_hidden_states() blocks do not nest")
    STATE.capture = ShardedOutput(score=score)
    try:
        yield STATE.capture
    finally:
        STATE.capture = None


def is_transparent(model: torch.nn.Module) -> bool:
    backbone = getattr(model, "base_model", model)
    return bool(getattr(backbone, "_ulysses_transparent", False))


def make_transparent(model: torch.nn.Module, sp: SequenceParallel) -> None:
    """Make ``model`` (a transformers model: ``*ForCausalLM``, ``*ForSequenceClassification``, a
    backbone...) take whole batches under SP and return whole outputs (see the module docstring).
    Idempotent; :func:`ulysses_attn.disable` undoes it.

    >>> make_transparent(model, get_sequence_parallel())
    >>> model(input_ids=ids, labels=ids).loss   # equals the model's loss without SP, on every rank
    """
    backbone: Any = getattr(model, "base_model", model)
    if getattr(backbone, "_ulysses_transparent", False):
        return
    original = backbone.forward
    names = list(inspect.signature(original).parameters)

    @functools.wraps(original)
    def forward(*args, **kwargs):
        if STATE.sp is None or STATE.sp.size == 1 or STATE.unsharded:
            return original(*args, **kwargs)
        if len(args) > len(names):
            raise TypeError(f"{type(backbone).__name__}.forward got {len(args)} positional arguments")
        kwargs = {**dict(zip(names, args)), **kwargs}
        if any(kwargs.get(k) is not None for k in _CACHE_ARGUMENTS):
            with unsharded():
                return original(**kwargs)
        return _sharded_forward(original, kwargs, STATE.sp)

    patches.replace(_RECORD, backbone, "forward", forward)
    vars(backbone)["_ulysses_transparent"] = True
    STATE.prepared_models.add(model)
    patches.track("ulysses_attn.model_attributes", backbone, lambda: vars(backbone).pop("_ulysses_transparent", None))


def _sharded_forward(original, kwargs: dict[str, Any], sp: SequenceParallel):
    ref = kwargs.get("input_ids")
    if ref is None:
        ref = kwargs.get("inputs_embeds")
    if ref is None:
        raise ValueError("a transparent sequence-parallel forward needs input_ids or inputs_embeds")
    batch, seq = ref.shape[:2]
    kwargs = {k: v for k, v in kwargs.items() if v is not None and k != "cache_position"}  # positions: global ids
    kwargs["use_cache"] = False  # a cache of this rank's shard is of no use to anyone
    shard = shard_batch(kwargs, sp)
    local = shard["input_ids" if "input_ids" in kwargs else "inputs_embeds"].shape[1]
    out = original(**shard)
    capture = STATE.capture
    if capture is not None and capture.hidden is None:
        capture.hidden, capture.batch, capture.seq = out[0], shard, seq  # out[0]: last_hidden_state
        if capture.score is not None:
            capture.scored = capture.score(out[0], shard, seq)
        return out
    return _gather_outputs(out, sp, batch, seq, local)


_PER_TOKEN = ("last_hidden_state", "hidden_states", "router_logits", "logits")  # re-assembled along the sequence
_NOT_PER_TOKEN = ("past_key_values", "cache_params", "aux_loss")  # no cache here (use_cache=False); a scalar


def _gather(value: Any, sp: SequenceParallel, batch: int, seq: int, local: int, name: str) -> Any:
    """``value`` (the backbone's output ``name``, a per-token tensor or a tuple of them) with the
    whole sequence: ``[B, S/P, ...]`` or, for router logits, ``[B * S/P, experts]``."""
    if isinstance(value, (tuple, list)):
        return type(value)(_gather(v, sp, batch, seq, local, name) for v in value)
    if value is None:
        return value
    if torch.is_tensor(value) and value.dim() >= 2 and value.shape[:2] == (batch, local):  # [B, S/P, ...]
        return all_gather_seq(value, sp.group)[:, :seq]
    if name == "router_logits" and torch.is_tensor(value) and value.dim() == 2 and value.shape[0] == batch * local:
        full = all_gather_seq(value.reshape(batch, local, -1), sp.group)[:, :seq]
        return full.reshape(batch * seq, -1)
    raise NotImplementedError(
        f"ulysses_attn transparent mode cannot re-assemble {name} of shape {tuple(getattr(value, 'shape', ()))} "
        "along the sequence."
    )


def _gather_outputs(out: Any, sp: SequenceParallel, batch: int, seq: int, local: int) -> Any:
    """The backbone's outputs, re-assembled by name: only outputs known to be per token are gathered;
    any other output (a pooled vector, a model-specific tensor) is refused rather than guessed from
    its shape, since a shard's value of it is not the whole sequence's."""
    if isinstance(out, tuple):  # return_dict=False: only last_hidden_state is known by position
        if any(v is not None for v in out[1:]):
            raise NotImplementedError(
                "ulysses_attn transparent mode needs return_dict=True for a backbone forward with more outputs than "
                "last_hidden_state (it re-assembles outputs by name)."
            )
        return (_gather(out[0], sp, batch, seq, local, "last_hidden_state"),) + tuple(out[1:])
    for name in list(out.keys()):
        if name == "attentions" and out[name] is not None:
            raise NotImplementedError("output_attentions is not supported under sequence parallelism.")
        if name in _PER_TOKEN:
            out[name] = _gather(out[name], sp, batch, seq, local, name)
        elif name not in _NOT_PER_TOKEN and out[name] is not None:
            raise NotImplementedError(
                f"ulysses_attn transparent mode does not know how to re-assemble the backbone's output {name!r} "
                f"({type(out[name]).__name__}) from sequence shards: {type(out).__name__} holds an output this "
                "package has not checked. Leave the option that asks for it off, or run without sequence parallelism."
            )
    return out
