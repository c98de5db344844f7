"""The automatic memory plan (ulysses_attn.memory_plan): the choice it makes for a budget, and that
every choice it can make trains exactly as the plain forward (fp32, CPU)."""

from __future__ import annotations

import copy

import pytest
import torch
from example_runs import compare, run_example
from helpers import CountAttentionKernels
from tiny_models import VOCAB, build

from ulysses_attn import MemoryOptions, configure_memory
from ulysses_attn.head import checked_logit_transform
from ulysses_attn.memory_plan import Choice, DecoderShape, activation_bytes, plan_memory, recompute_share
from ulysses_attn.state import STATE

LLAMA_8B = DecoderShape(layers=32, hidden=4096, intermediate=14336, heads=32, kv_heads=8, head_dim=128, vocab=128256)
GIB = 1 << 30


def test_plan_takes_the_least_recompute_that_fits_and_says_when_nothing_does():
    static = 60 * GIB
    plans = [plan_memory(LLAMA_8B, 16384, 16384, budget, static, host_budget_bytes=100 * GIB)
             for budget in (10_000 * GIB, 150 * GIB, 100 * GIB, 75 * GIB, 68 * GIB)]
    assert plans[0].choice == Choice(0, True, False, False) and plans[0].recompute_share == 0
    assert 0 < plans[1].choice.checkpointed < LLAMA_8B.layers and plans[1].choice.selective  # some layers only
    shares = [p.recompute_share for p in plans]
    assert shares == sorted(shares) and all(p.fits for p in plans), [p.describe(32) for p in plans]
    for p, budget in zip(plans, (10_000, 150, 100, 75, 68)):
        assert p.predicted_peak_bytes <= budget * GIB
    # every cheaper candidate would not have fit: the plan is the cheapest that does
    for p in plans[1:]:
        cheaper = [c for c in _all_choices() if recompute_share(LLAMA_8B, c, 16384, 16384) < p.recompute_share]
        assert all(static + activation_bytes(LLAMA_8B, c, 16384)[0] > p.budget_bytes
                   or activation_bytes(LLAMA_8B, c, 16384)[1] > 100 * GIB for c in cheaper)
    # the host bounds the offload; too little memory gives the smallest peak, marked as not fitting
    no_host = plan_memory(LLAMA_8B, 131072, 131072, 80 * GIB, 60 * GIB, host_budget_bytes=1 * GIB)
    assert not no_host.choice.offload
    tight = plan_memory(LLAMA_8B, 1 << 20, 1 << 20, 70 * GIB, 60 * GIB, host_budget_bytes=10_000 * GIB)
    assert not tight.fits and tight.choice.offload and tight.choice.tiled_mlp and tight.predicted_peak_bytes > 70 * GIB


def _all_choices():
    from ulysses_attn.memory_plan import candidates

    return candidates(LLAMA_8B.layers)


def test_longer_sequences_shift_the_plan_towards_selective_checkpointing():
    # at long S attention dominates the step: recomputing it costs more than keeping its output
    short = plan_memory(LLAMA_8B, 8192, 8192, 66 * GIB, 60 * GIB, host_budget_bytes=1000 * GIB)
    long = plan_memory(LLAMA_8B, 131072, 131072, 100 * GIB, 60 * GIB, host_budget_bytes=1000 * GIB)
    assert long.choice.selective and long.choice.checkpointed == LLAMA_8B.layers
    assert short.fits and long.fits


class Counting:
    """Forward calls of each decoder layer's attention and the largest MLP input (rows)."""

    def __init__(self, model):
        self.attention = [0] * len(model.model.layers)
        self.mlp_rows = 0
        for i, layer in enumerate(model.model.layers):
            layer.self_attn.register_forward_hook(lambda *_, i=i: self._attended(i))
            layer.mlp.down_proj.register_forward_pre_hook(self._mlp)  # inside the tiled forward

    def _attended(self, i):
        self.attention[i] += 1

    def _mlp(self, _, args):
        self.mlp_rows = max(self.mlp_rows, args[0].shape[-2])


def _step(model, batch):
    model.train()
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("choice", [Choice(0, True, False, False), Choice(2, True, False, False),
                                    Choice(3, False, False, True), Choice(4, True, True, True),
                                    Choice(4, False, True, False)], ids=lambda c: c.describe(4).replace(" ", "_"))
def test_every_choice_equals_the_plain_forward_and_takes_effect(choice):
    from ulysses_attn.memory import apply_choice

    ref = build("llama", "sdpa", num_hidden_layers=4)
    model = copy.deepcopy(ref)
    ids = torch.randint(1, VOCAB, (2, 48), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids.clone()}
    ref_loss, ref_grads = _step(ref, batch)
    configure_memory(model, MemoryOptions.automatic(mlp_chunk_tokens=16, offload_min_bytes=0))
    model.gradient_checkpointing_enable()
    model.train()
    checked_logit_transform(model)  # the chunked loss's one-time probe of the head, outside the counted step
    from ulysses_attn import memory

    original = memory._plan
    memory._plan = lambda m, options, layers, args, kwargs: apply_choice(m, choice)
    try:
        seen = Counting(model)
        replayed = STATE.replayed_attention_outputs
        with CountAttentionKernels() as kernels:
            loss, grads = _step(model, batch)
    finally:
        memory._plan = original
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    for name, g in grads.items():
        assert ((g - ref_grads[name]).norm() / ref_grads[name].norm()).item() < 1e-5, name
    k = choice.checkpointed
    assert seen.attention == [2] * k + [1] * (4 - k), seen.attention  # the first k layers were recomputed
    assert kernels.calls == 4 + (0 if choice.selective else k)  # ... with their attention kernel unless kept
    assert STATE.replayed_attention_outputs - replayed == (k if choice.selective else 0)
    assert (seen.mlp_rows <= 16) == choice.tiled_mlp, seen.mlp_rows
    assert (model._ulysses_offloader.offloaded_bytes > 0) == choice.offload


def test_the_plan_follows_the_budget_in_a_training_step():
    """The same model and batch: a large budget plans no recompute, a small one checkpoints; the
    chosen switches are the ones in force (attention calls counted), and both equal plain."""
    ref = build("llama", "sdpa", num_hidden_layers=4)
    ids = torch.randint(1, VOCAB, (1, 64), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "labels": ids.clone()}
    ref_loss, ref_grads = _step(copy.deepcopy(ref), batch)
    shape = DecoderShape.of(ref.config)
    params = sum(p.numel() * 4 for p in ref.parameters())
    static = 2 * params  # what the plan counts on CPU: parameters and their gradients
    tight = static + min(activation_bytes(shape, c, 64, act=4, loss_chunk_tokens=64)[0]
                         for c in _choices(4) if c.checkpointed == 4 and not c.offload) + 1
    for budget, attention in ((None, [1, 1, 1, 1]), (tight, [2, 2, 2, 2])):
        model = copy.deepcopy(ref)
        configure_memory(model, MemoryOptions.automatic(memory_budget_bytes=budget, loss_chunk_tokens=64))
        model.gradient_checkpointing_enable()
        checked_logit_transform(model)
        seen = Counting(model)
        loss, grads = _step(model, batch)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
        for name, g in grads.items():
            assert ((g - ref_grads[name]).norm() / ref_grads[name].norm()).item() < 1e-5, name
        assert seen.attention == attention  # no layer recomputed, then every one
    model.model.layers[0].gradient_checkpointing = False  # as a plan leaves it for an unconstrained step
    import ulysses_attn

    ulysses_attn.disable()  # gives the layers back as transformers' checkpointing left them
    assert all(layer.gradient_checkpointing for layer in model.model.layers)
    assert not hasattr(model, "_ulysses_memory")


def _choices(layers):
    from ulysses_attn.memory_plan import candidates

    return candidates(layers)


def test_plan_options_are_checked():
    with pytest.raises(ValueError, match="memory_budget_bytes"):
        MemoryOptions.automatic(memory_budget_bytes=0)
    import ulysses_attn

    with pytest.raises(ValueError, match="long_sequence"):
        ulysses_attn.enable(1, long_sequence="yes")


def test_launcher_long_sequence_auto_sp2_equals_plain(tmp_path, baselines):
    """``--long-sequence auto`` at SP 2 with a budget that forces checkpointing: the same losses,
    grad norms and weights as the plain run; every rank took the same plan."""
    ref = baselines("plain", extra=["--eval"])  # the session's cache: the same name, the same arguments
    sp = run_example(tmp_path, 2, 2, extra=["--eval"], launch_flags=["--long-sequence", "auto"],
                     env={"ULYSSES_MEMORY_BUDGET_GIB": "0.0001"})
    diff = compare(sp, ref)
    assert diff["same_length"] and max(diff["logged"].values()) < 1e-5 and diff["weights"] < 5e-5, diff
    assert sp[0]["activation_checkpointing"] and not ref[0]["activation_checkpointing"]
    assert sp[0]["longest_sequence_seen"] <= ref[0]["longest_sequence_seen"] // 2
