"""Memory options (chunked loss, tiled MLP, checkpoint offload) give the same loss and gradients
as the plain forward, and really bound what they claim to bound."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from example_runs import compare, run_example
from helpers import CountAttentionKernels
from tiny_models import REFERENCE_ATTN, VOCAB, build
from torch.utils._python_dispatch import TorchDispatchMode

from ulysses_attn import MemoryOptions, chunked_causal_lm_loss, configure_memory, tile_mlp
from ulysses_attn.head import checked_logit_transform
from ulysses_attn.selective_checkpoint import keeps_attention_outputs

CHUNK = 7
HIDDEN = 32  # tiny_models.COMMON


class LargestVocabTensor(TorchDispatchMode):
    """Rows of the largest ``[..., vocab]`` tensor any op produced (forward and backward), the LM
    head's weight (``[hidden, vocab]`` when transposed) and its gradient aside."""

    def __init__(self):
        super().__init__()
        self.rows = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] == VOCAB and t.numel() != HIDDEN * VOCAB:
                self.rows = max(self.rows, t.numel() // VOCAB)
        return out


def _loss_and_grads(model, batch):
    model.train()
    with LargestVocabTensor() as seen:
        out = model(**batch)
        out.loss.backward()
    return out.loss.detach(), {n: p.grad for n, p in model.named_parameters()}, seen.rows


@pytest.mark.parametrize("arch,tied", [("llama", False), ("llama", True), ("gemma2", False)])
def test_long_sequence_options_equal_plain_forward_and_bound_logits(arch, tied, monkeypatch):
    import ulysses_attn.loss

    fused_calls = []
    fused = ulysses_attn.loss.linear_cross_entropy_sum
    monkeypatch.setattr(ulysses_attn.loss, "linear_cross_entropy_sum",
                        lambda *a: fused_calls.append(a[3]) or fused(*a))
    ref = build(arch, REFERENCE_ATTN[arch], tie_word_embeddings=tied)
    model = copy.deepcopy(ref)
    ids = torch.randint(1, VOCAB, (2, 40), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[0, :10] = -100
    batch = {"input_ids": ids, "labels": labels}
    ref_loss, ref_grads, ref_rows = _loss_and_grads(ref, batch)

    configure_memory(model, MemoryOptions.long_sequence(loss_chunk_tokens=CHUNK, mlp_chunk_tokens=8,
                                                        offload_min_bytes=40 * 32 * 4))
    model.gradient_checkpointing_enable()
    mlp_rows = []
    for layer in model.model.layers:
        layer.mlp.down_proj.register_forward_hook(lambda m, a, o: mlp_rows.append(o[..., 0].numel()))
    loss, grads, rows = _loss_and_grads(model, batch)

    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    for name, g in grads.items():
        assert ((g - ref_grads[name]).norm() / ref_grads[name].norm()).item() < 1e-5, name
    assert ref_rows >= 2 * 40 and rows <= CHUNK  # no logits tensor larger than one chunk, fwd or bwd
    # a plain head takes the fused path (gradients in the forward); soft-capping (Gemma 2) the checkpointed one
    assert fused_calls == ([] if arch == "gemma2" else [-(-(2 * 40 - 1 - 10) // CHUNK)])
    assert max(mlp_rows) <= 2 * 8 and len(mlp_rows) > 2 * len(model.model.layers)
    # exactly the checkpointed layer inputs ([2, 40, 32] fp32) went through the offloader; what the
    # final norm saves stays (the rotary cos/sin are below offload_min_bytes here)
    assert model._ulysses_offloader.offloaded_bytes == len(model.model.layers) * 2 * 40 * 32 * 4


def test_offloader_copies_a_tensor_saved_twice_once_and_keeps_the_tail():
    from ulysses_attn.offload import CheckpointOffloader

    offloader = CheckpointOffloader(min_bytes=0)
    x = torch.randn(8, 8, dtype=torch.float64, requires_grad=True)
    with offloader:
        square = x * x  # saves x twice: one copy
        offloader.keep_rest()
        fourth = square * square  # kept on the device
    fourth.sum().backward()
    assert offloader.offloaded_bytes == x.numel() * x.element_size()
    torch.testing.assert_close(x.grad, 4 * x.detach() ** 3)


def test_offload_two_forwards_then_one_backward():
    # each forward starts a new record list; the backward of the first must use its own records
    # (here the second forward's inputs stay below offload_min_bytes: it has none)
    ref = build("llama", REFERENCE_ATTN["llama"])
    model = copy.deepcopy(ref)
    configure_memory(model, MemoryOptions.long_sequence(offload_min_bytes=64 * HIDDEN * 4))
    model.gradient_checkpointing_enable()
    model.train()
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(1, VOCAB, (1, n), generator=gen) for n in (64, 8)]
    sum(ref(input_ids=ids, labels=ids).loss for ids in batches).backward()
    sum(model(input_ids=ids, labels=ids).loss for ids in batches).backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert ((p.grad - q.grad).norm() / q.grad.norm()).item() < 1e-5, name


def test_fused_linear_cross_entropy_equals_plain_under_loss_scaling():
    from ulysses_attn.fused_cross_entropy import linear_cross_entropy_sum

    g = torch.Generator().manual_seed(0)
    h = torch.randn(50, 16, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(40, 16, dtype=torch.float64, generator=g, requires_grad=True)
    y = torch.randint(0, 40, (50,), generator=g)
    # the loss is scaled after the head (as the Trainer does): the weight gradient must follow
    ref = torch.nn.functional.cross_entropy(h @ w.t(), y, reduction="sum") * 3.7
    ref_grads = torch.autograd.grad(ref, (h, w))
    out = linear_cross_entropy_sum(h, w, y, chunks=7) * 3.7
    grads = torch.autograd.grad(out, (h, w))
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=0)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_frozen_head_log_probs_and_row_sums_equal_plain_logits():
    """The LoRA head paths (weight frozen): per-token log-probs with the hidden gradient computed in
    the forward, their per-row sums and the no-grad logit sums equal the plain full-logits values."""
    from ulysses_attn.fused_cross_entropy import frozen_linear_log_probs
    from ulysses_attn.loss import chunked_logit_sums, chunked_row_log_probs

    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(16, 40, bias=True, dtype=torch.float64).requires_grad_(False)
    h = torch.randn(3, 11, 16, dtype=torch.float64, generator=g, requires_grad=True)
    labels = torch.randint(0, 40, (3, 11), generator=g)
    labels[0, :4] = labels[2, 7:] = -100
    upstream = torch.randn(3, dtype=torch.float64, generator=g)  # a weighted sum, as a DPO loss is
    logp = head(h).log_softmax(-1).gather(2, labels.clamp(min=0)[..., None]).squeeze(2)
    ref_rows = (logp * (labels != -100)).sum(-1)
    (ref_grad,) = torch.autograd.grad((ref_rows * upstream).sum(), h)
    rows = chunked_row_log_probs(h, head, labels, chunk_tokens=4)
    assert head._forward_pre_hooks == {} and not head.weight.requires_grad  # the fused, frozen path ran
    (grad,) = torch.autograd.grad((rows * upstream).sum(), h)
    torch.testing.assert_close(rows, ref_rows, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-12)
    flat, y = h.detach().reshape(-1, 16), labels.reshape(-1).clamp(min=0)
    per_token = frozen_linear_log_probs(flat, head.weight, head.bias, y, chunks=5)
    torch.testing.assert_close(per_token, head(flat).log_softmax(-1).gather(1, y[:, None]).squeeze(1))
    torch.testing.assert_close(chunked_logit_sums(flat, head, chunk_tokens=6), head(flat).sum(-1))
    with pytest.raises(ValueError, match="do not train"):
        frozen_linear_log_probs(flat, head.weight.detach().requires_grad_(), None, y, chunks=1)
    trainable = torch.nn.Linear(16, 40, bias=False, dtype=torch.float64)  # the checkpointed path
    rows = chunked_row_log_probs(h, trainable, labels, chunk_tokens=4)
    logp = trainable(h).log_softmax(-1).gather(2, labels.clamp(min=0)[..., None]).squeeze(2)
    ref = (logp * (labels != -100)).sum(-1)
    torch.testing.assert_close(rows, ref)
    torch.testing.assert_close(*(torch.autograd.grad(r.sum(), trainable.weight)[0] for r in (rows, ref)))


def test_fused_linear_cross_entropy_in_bf16_matches_fp32_logits():
    """bf16 inputs: the gradients are written in bf16 from fp32 probabilities, as autograd through
    ``cross_entropy(logits.float())`` gives them (the form DeepSpeed ALST and HF use)."""
    from ulysses_attn.fused_cross_entropy import linear_cross_entropy_sum

    g = torch.Generator().manual_seed(1)
    h = torch.randn(64, 32, generator=g).bfloat16().requires_grad_()
    w = (torch.randn(96, 32, generator=g) / 4).bfloat16().requires_grad_()
    y = torch.randint(0, 96, (64,), generator=g)
    ref = torch.nn.functional.cross_entropy((h @ w.t()).float(), y, reduction="sum")
    ref_grads = torch.autograd.grad(ref, (h, w))
    out = linear_cross_entropy_sum(h, w, y, chunks=5)
    grads = torch.autograd.grad(out, (h, w))
    assert out.dtype == torch.float32 and all(gr.dtype == torch.bfloat16 for gr in grads)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=0)
    for got, want in zip(grads, ref_grads):  # bf16 rounding of the matmul outputs, nothing else
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


def test_chunked_backward_builds_no_full_size_gradient_per_chunk():
    """The tiled MLP and the checkpointed loss split their input with one ``split``: the backward
    concatenates the chunk gradients once. (``tensor_split`` slices would each zero-fill a
    gradient of the whole input and add it: 64 full-size fills and adds per layer at 128K tokens,
    3% of a Llama-1B step on an H200.)"""
    from ulysses_attn.comm import split_chunks

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.__name__)
            return func(*args, **(kwargs or {}))

    x = torch.randn(2, 11, 4, requires_grad=True)
    chunks = split_chunks(x, 4, dim=-2)
    assert [c.shape[-2] for c in chunks] == [t.shape[-2] for t in x.tensor_split(4, dim=-2)]
    out = torch.cat([c * (i + 1) for i, c in enumerate(chunks)], dim=-2).sum()
    with Ops() as ops:
        out.backward()
    assert not [n for n in ops.names if "slice_backward" in n or n.startswith("zeros")], ops.names
    weights = torch.cat([torch.full((n,), i + 1.0) for i, n in enumerate([3, 3, 3, 2])])
    torch.testing.assert_close(x.grad, weights[None, :, None].expand_as(x))

    # the same check through a tiled MLP: no op of its backward builds a zero-filled full gradient
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    model = AutoModelForCausalLM.from_config(cfg)
    tile_mlp(model, chunk_tokens=3)
    mlp = model.model.layers[0].mlp
    h = torch.randn(1, 20, 16, requires_grad=True)
    with Ops() as ops:
        mlp(h).sum().backward()
    assert "slice_backward" not in " ".join(ops.names)
    assert ops.names.count("mm.default") >= 7 * 3  # it did run in 7 chunks (3 matmuls each)


def test_tile_mlp_refuses_mixture_of_experts():
    from transformers import AutoModelForCausalLM, MixtralConfig

    cfg = MixtralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=2)
    with pytest.raises(NotImplementedError, match="mixture-of-experts"):
        tile_mlp(AutoModelForCausalLM.from_config(cfg))


ENV = {"ULYSSES_LOSS_CHUNK_TOKENS": "48", "ULYSSES_MLP_CHUNK_TOKENS": "40", "ULYSSES_OFFLOAD_MIN_BYTES": "4096"}


def test_launcher_long_sequence_and_selective_switches_sp2_equal_plain(tmp_path, baselines):
    # the hooked LM head takes the checkpointed loss chunks (the fused path runs in test_trainer's SP runs)
    ref = baselines("plain_head_rows", extra=["--eval", "--record_head_rows"])
    sp = run_example(tmp_path, 2, 2, extra=["--eval", "--record_head_rows"],
                     launch_flags=["--long-sequence", "--selective-checkpointing"],
                     env=ENV)
    diff = compare(sp, ref)
    assert diff["same_length"] and max(diff["logged"].values()) < 1e-5 and diff["weights"] < 5e-5, diff
    assert sp[0]["activation_checkpointing"] and not ref[0]["activation_checkpointing"]
    assert sp[0]["selective_checkpointing_layers"] == 2 and ref[0]["selective_checkpointing_layers"] == 0
    assert ref[0]["lm_head_rows_max"] > 48 >= sp[0]["lm_head_rows_max"] > 0  # the hooked head was called
    assert ref[0]["mlp_rows_max"] > 2 * 40 >= sp[0]["mlp_rows_max"]
    assert sp[0]["longest_sequence_seen"] <= ref[0]["longest_sequence_seen"] // 2


def test_selective_checkpointing_keeps_attention_and_equals_full_recompute():
    ref = build("llama", "sdpa")
    model = copy.deepcopy(ref)
    ids = torch.randint(1, VOCAB, (2, 40), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids.clone()}
    layers = len(ref.model.layers)
    runs = {}
    for name, m, options in (("full", ref, MemoryOptions()),
                             ("selective", model, MemoryOptions(tiled_mlp=True, mlp_chunk_tokens=8,
                                                                selective_checkpointing=True))):
        configure_memory(m, options)
        m.gradient_checkpointing_enable()
        m.train()
        checked_logit_transform(m)  # the chunked loss's one-time probe of the head, outside the counted step
        with CountAttentionKernels() as count:
            loss = m(**batch).loss
            loss.backward()
        runs[name] = (loss.detach(), {n: p.grad for n, p in m.named_parameters()}, count.calls)
    (ref_loss, ref_grads, ref_calls), (loss, grads, calls) = runs["full"], runs["selective"]
    assert ref_calls == 2 * layers  # full checkpointing runs every attention forward twice
    assert calls == layers  # the kept outputs spare the recompute
    from ulysses_attn.selective_checkpoint import keep_attention_outputs

    assert keep_attention_outputs(model) == 0 and keep_attention_outputs(ref) == layers  # idempotent; ref was full
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    for name, g in grads.items():
        assert ((g - ref_grads[name]).norm() / ref_grads[name].norm()).item() < 1e-5, name


def test_selective_checkpointing_replays_in_order_and_says_when_the_recompute_differs():
    from torch.utils.checkpoint import checkpoint

    from ulysses_attn import selective_checkpoint as sc

    q = torch.randn(1, 2, 6, 4, requires_grad=True)
    calls, seen_keeping = {"n": 0}, []

    def region(x, extra_call):
        seen_keeping.append(sc.keeping())
        calls["n"] += 1
        if extra_call and calls["n"] > 1:  # the recompute calls one more attention kernel than the forward
            with torch.no_grad():
                torch.nn.functional.scaled_dot_product_attention(x, x, x)
        out = torch.nn.functional.scaled_dot_product_attention(x, x, x, is_causal=True)
        return (out * x).sum()

    before = sc.replayed_attention_outputs()
    with CountAttentionKernels() as count:
        checkpoint(region, q, False, use_reentrant=False, context_fn=sc._context).backward()
    grad = q.grad.clone()
    q.grad = None
    region(q, False).backward()
    torch.testing.assert_close(grad, q.grad)
    assert count.calls == 1 and sc.replayed_attention_outputs() == before + 1
    assert seen_keeping == [True, False, False]  # the forward keeps; the recompute and the plain call do not
    calls["n"] = 0
    with pytest.raises(RuntimeError, match="the recompute ran attention kernel #2"):
        checkpoint(region, q, True, use_reentrant=False, context_fn=sc._context).backward()


def _sp_memory_worker(rank, world, tied):
    import torch.distributed as dist

    import ulysses_attn
    from ulysses_attn.loss import causal_lm_loss

    ulysses_attn.init_sequence_parallel(world)
    ids = torch.randint(1, VOCAB, (1, 61), generator=torch.Generator().manual_seed(3))
    labels = ids.clone()
    labels[0, :9] = -100
    batch = {"input_ids": ids, "labels": labels, "use_cache": False}
    ref = build("llama", "sdpa", tie_word_embeddings=tied)
    ref_out = ref(**batch)
    ref_out.loss.backward()

    model = build("llama", "ulysses_flash", tie_word_embeddings=tied)
    model.loss_function = causal_lm_loss
    configure_memory(model, MemoryOptions.long_sequence(loss_chunk_tokens=5, mlp_chunk_tokens=4, offload_min_bytes=0,
                                                        selective_checkpointing=True, offload_attention_outputs=False))
    model.gradient_checkpointing_enable()
    model.train()
    seen = []
    for layer in model.model.layers:
        layer.mlp.down_proj.register_forward_hook(lambda m, a, o: seen.append(o.shape[1]))
    shard = ulysses_attn.shard_batch(batch)
    checked_logit_transform(model)  # the chunked loss's one-time probe of the head, outside the counted step
    with CountAttentionKernels() as count:
        out = model(**shard)
        out.loss.backward()
    errors = {}
    for n, p in model.named_parameters():
        g = p.grad.clone()
        dist.all_reduce(g)
        ref_g = dict(ref.named_parameters())[n].grad
        errors[n] = ((g / world - ref_g).norm() / ref_g.norm()).item()
    offloaded = model._ulysses_offloader.offloaded_bytes
    # again, with the kept attention outputs offloaded too (the default; bookkeeping only on CPU): the same step
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    configure_memory(model, dataclasses.replace(model._ulysses_memory, offload_attention_outputs=True))
    with CountAttentionKernels() as count_kept:
        again = model(**shard)
        again.loss.backward()
    same = again.loss.item() == out.loss.item() and all(torch.equal(p.grad, grads[n]) for n, p in model.named_parameters())
    return {"loss": (out.loss.item(), ref_out.loss.item()), "grads": errors, "shard": shard["input_ids"].shape[1],
            "mlp_rows": max(seen), "attention_calls": count.calls, "layers": len(model.model.layers),
            "offloaded": offloaded, "logits": out.logits, "offloaded_with_kept": model._ulysses_offloader.offloaded_bytes,
            "kept_offload_same_step": same, "attention_calls_kept_offload": count_kept.calls}


@pytest.mark.parametrize("world,tied", [(2, False), (4, True)])
def test_long_sequence_and_selective_checkpointing_under_sp_equal_plain_forward(world, tied):
    from distributed import run_distributed

    for r in run_distributed(_sp_memory_worker, world, tied):
        assert r["shard"] == -(-61 // world)  # the layers ran on the rank's shard only
        assert r["mlp_rows"] <= 4 and r["logits"] is None and r["offloaded"] > 0
        assert r["attention_calls"] == r["layers"]  # attention kept, not recomputed
        # offload_attention_outputs: the kept outputs go too, at least each layer's attention output
        # [1, S, H/P, D] over the full (padded) sequence S = shard x world: hidden 32, fp32
        kept_bytes = r["layers"] * r["shard"] * world * (32 // world) * 4
        assert r["offloaded_with_kept"] >= r["offloaded"] + kept_bytes
        assert r["kept_offload_same_step"] and r["attention_calls_kept_offload"] == r["layers"]
        sp_loss, ref_loss = r["loss"]
        assert sp_loss == pytest.approx(ref_loss, rel=1e-5)
        bad = {n: e for n, e in r["grads"].items() if not e < 1e-5}
        assert not bad, bad


def test_configure_memory_again_switches_options_off_and_sizes_are_checked():
    ref = build("llama", REFERENCE_ATTN["llama"])
    model = copy.deepcopy(ref)
    model.gradient_checkpointing_enable()
    ids = torch.randint(1, VOCAB, (1, 24), generator=torch.Generator().manual_seed(0))
    mlp_rows = []
    model.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, a, o: mlp_rows.append(o.shape[1]))
    configure_memory(model, MemoryOptions(tiled_mlp=True, mlp_chunk_tokens=4, selective_checkpointing=True))
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    assert max(mlp_rows) == 4 and all(keeps_attention_outputs(layer) for layer in model.model.layers)
    mlp_rows.clear()
    configure_memory(model, MemoryOptions())  # tiled MLP and selective checkpointing off again
    model.zero_grad()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert mlp_rows and set(mlp_rows) == {24}  # untiled (the recompute may stop before the hook fires)
    assert not any(keeps_attention_outputs(layer) for layer in model.model.layers)
    ref.train()
    ref_loss = ref(input_ids=ids, labels=ids).loss
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    for bad in (dict(loss_chunk_tokens=0), dict(mlp_chunk_tokens=-3), dict(offload_min_bytes=-1)):
        with pytest.raises(ValueError, match="must be"):
            MemoryOptions(**bad)
    with pytest.raises(ValueError, match="positive number of tokens"):
        chunked_causal_lm_loss(torch.zeros(1, 4, HIDDEN), model.lm_head, labels=torch.ones(1, 4, dtype=torch.long),
                               chunk_tokens=0)
