"""One training step: forward and backward in the system's offload context, then the gradient
all-reduce and AdamW (or the ZeRO-3 engine's step); the first backward's gradient norms."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .measure import EventPair
from .runners import Runner


def sync_grads(model, world: int) -> None:
    """Plain data parallelism: every gradient averaged over all ranks, one all-reduce per parameter."""
    if world == 1:
        return
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.AVG)


def grad_norms(model, engine) -> dict[str, float]:
    """Norms of a few parameters' gradients (whole, also under ZeRO-3): the same in every mode when
    they compute the same thing. Called after the first backward, on every rank; nothing the size
    of a gradient is allocated (no gather, no fp32 copy), so it cannot push a run near the memory
    limit over it."""
    inner = model.model
    params = {"lm_head": model.lm_head.weight, "embed_tokens": inner.embed_tokens.weight,
              "layer0.q_proj": inner.layers[0].self_attn.q_proj.weight,
              "layer0.down_proj": inner.layers[0].mlp.down_proj.weight,
              "last.up_proj": inner.layers[-1].mlp.up_proj.weight}
    if engine is None:
        return {k: float(torch.linalg.vector_norm(p.grad, dtype=torch.float32)) for k, p in params.items()}
    from deepspeed.utils import safe_get_local_grad

    # each rank holds a partition of every gradient: sum the squares over the world
    squares = torch.stack([torch.linalg.vector_norm(safe_get_local_grad(p), dtype=torch.float32) ** 2
                           for p in params.values()])
    dist.all_reduce(squares)
    return {k: float(v) for k, v in zip(params, squares.sqrt().tolist())}


@dataclass
class Step:
    """A configuration ready to train (:func:`~.train.prepare`); calling it runs one step and returns
    the timer of its gradient all-reduce."""

    runner: Runner
    model: torch.nn.Module
    opt: torch.optim.Optimizer
    engine: object | None  # the ZeRO-3 engine (it reduces the gradients and steps the optimizer)
    offload: object  # the system's context around forward and backward
    batch: dict
    args: object
    world: int
    losses: list[torch.Tensor] = field(default_factory=list)
    first_grads: dict[str, float] = field(default_factory=dict)

    def __call__(self) -> EventPair:
        ev = EventPair()
        with self.offload:  # ALST's offload context spans forward and backward
            loss = self.runner.loss(self.model, self.batch, self.args)
            if self.engine is not None:
                self.engine.backward(loss)
            else:
                loss.backward()
        if self.engine is not None:
            if not self.first_grads:
                self.first_grads.update(grad_norms(self.model, self.engine))
            self.engine.step()
        else:
            ev.start()
            sync_grads(self.model, self.world)
            ev.stop()
            if not self.first_grads:
                self.first_grads.update(grad_norms(self.model, None))
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        self.losses.append(loss.detach())
        return ev
