"""Gated delta-net layers (Qwen3-Next, Qwen3.5) and short-convolution layers (LFM2, LFM2-MoE, LFM3)
under SP equal one process (fp64 and fp32, CPU, gloo).

ulysses_attn/linear_attention.py: the causal conv gets a halo of the k-1 positions before its shard,
the delta rule runs Ulysses-style over the full sequence for Hv/P value heads. Packed rows, cached
forwards and value heads that P does not divide are refused under SP; generation stays unsharded.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from distributed import run_distributed
from zoo import GRAD_FLOOR, VOCAB, rel_err, tiny_config

import ulysses_attn
from ulysses_attn import linear_attention, shard_batch
from ulysses_attn.comm import all_gather_seq
from ulysses_attn.loss import causal_lm_loss

# fp64 models: every gradient without a floor, to 1e-6 (transformers' torch delta-rule kernel computes in fp32
# inside; observed <= 4e-7). fp32: 1e-5, a gradient compared against the model's largest where it is smaller
# (the zoo's floor): the decay gradients (A_log, dt_bias) of that kernel are ill-conditioned in fp32 -- the
# one-process fp32 model is 1e-3 off its fp64 self there.
RTOL = {torch.float64: 1e-6, torch.float32: 1e-5}
MODELS = ("qwen3_next", "qwen3_5_text", "qwen3_5_moe_text")
LAYERS = ["linear_attention", "full_attention", "linear_attention"]
SHORT_CONV_MODELS = ("lfm2", "lfm2_moe", "lfm3")
SHORT_CONV_LAYERS = ["conv", "full_attention", "conv"]
# Mamba-2 hybrids: mamba / attention / mamba layers, 32-token SSD chunks (the scan crosses chunks)
MAMBA_MODELS = {
    "bamba": dict(num_hidden_layers=3, attn_layer_indices=[1], mamba_chunk_size=32),
    "granitemoehybrid": dict(num_hidden_layers=3, layer_types=["mamba", "attention", "mamba"], mamba_chunk_size=32),
    "nemotron_h": dict(layers_block_type=["mamba", "attention", "mamba"], mamba_num_heads=8, chunk_size=32),
    "falcon_h1": dict(mamba_chunk_size=32, mamba_d_ssm=32),  # every layer runs attention and Mamba-2 side by side
    "zamba2": dict(chunk_size=32),  # a Mamba-2 layer, then one with the shared attention block
}


def _config(model_type: str, **overrides):
    cfg = tiny_config(model_type)
    if model_type in MAMBA_MODELS:
        changes = {**MAMBA_MODELS[model_type], **overrides}
        if "num_hidden_layers" in changes or "layers_block_type" in changes:  # kinds derived in __init__
            return type(cfg)(**{**cfg.to_dict(), **changes})
        for k, v in changes.items():
            setattr(cfg, k, v)
        return cfg
    layers = SHORT_CONV_LAYERS if model_type in SHORT_CONV_MODELS else LAYERS
    cfg.num_hidden_layers, cfg.layer_types = len(layers), list(layers)
    if hasattr(cfg, "full_attn_idxs"):  # LFM2 keeps its layer kinds in both fields
        cfg.full_attn_idxs = [i for i, kind in enumerate(layers) if kind == "full_attention"]
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def build(cfg, attn: str, dtype: torch.dtype = torch.float32, seed: int = 0):
    """The model in ``dtype`` (MoE experts as a loop: grouped_mm has no fp64)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation=attn, dtype=dtype,
                                             experts_implementation="eager")
    return model.eval()


def _batch(kind: str) -> dict:
    """Longer than the kernel's 64-token chunk, so the delta rule crosses chunks."""
    g = torch.Generator().manual_seed(3)
    if kind == "plain":  # a length that is not a multiple of P
        ids = torch.randint(3, VOCAB - 3, (1, 150), generator=g)
        return {"input_ids": ids, "labels": ids.clone(), "use_cache": False}
    if kind == "padded":  # right padded, B = 2
        ids = torch.randint(3, VOCAB - 3, (2, 133), generator=g)
        mask = torch.ones_like(ids)
        mask[1, 77:] = 0
        ids = ids * mask
        labels = ids.masked_fill(mask == 0, -100)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels, "use_cache": False}
    raise ValueError(kind)


# --- the halo-exchange convolution alone ---------------------------------------------------------------


def _halo_worker(rank, world):
    sp = ulysses_attn.init_sequence_parallel(world)
    from transformers.models.qwen3_next.modeling_qwen3_next import causal_conv1d_forward

    conv_sp = linear_attention.sp_causal_conv(causal_conv1d_forward)
    out = {}
    for seq in (24, 8):  # at P = 4, 8 tokens leave 2 per shard: the halo of 3 spans two ranks
        g = torch.Generator().manual_seed(seq)
        x = torch.randn(2, 6, seq, generator=g, dtype=torch.float64)
        up = torch.randn(2, 6, seq, generator=g, dtype=torch.float64)
        conv = torch.nn.Conv1d(6, 6, 4, groups=6, padding=3, bias=False).double()
        with torch.no_grad():
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=g, dtype=torch.float64))
        full_x = x.clone().requires_grad_()
        full = F.silu(conv(full_x)[..., :seq])  # the module as a full-sequence causal conv
        (full * up).sum().backward()
        full_w_grad, conv.weight.grad = conv.weight.grad.clone(), None

        local = seq // world
        part = slice(rank * local, (rank + 1) * local)
        x_local = x[..., part].clone().requires_grad_()
        y = conv_sp(conv, x_local, None, 0, activation="silu")
        (y * up[..., part]).sum().backward()
        w_grad = conv.weight.grad.clone()
        dist.all_reduce(w_grad, group=sp.group)
        out[seq] = {
            "y": rel_err(y.detach(), full.detach()[..., part]),
            "x_grad": rel_err(x_local.grad, full_x.grad[..., part]),
            "w_grad": rel_err(w_grad, full_w_grad),
        }
    return out


@pytest.mark.parametrize("world", [2, 4])
def test_halo_exchange_conv_equals_full_sequence_conv(world):
    for result in run_distributed(_halo_worker, world):
        for seq, errs in result.items():
            assert all(e < 1e-12 for e in errs.values()), (seq, errs)


# --- whole models ----------------------------------------------------------------------------------------


def _parity(model_type: str, kind: str, world: int, dtype: torch.dtype, checkpointing: bool = False) -> dict:
    sp = ulysses_attn.get_sequence_parallel()
    cfg = _config(model_type)
    batch = _batch(kind)
    ref = build(cfg, "sdpa", dtype)
    ref_out = ref(**batch)
    ref_out.loss.backward()

    model = build(cfg, "ulysses_flash", dtype)
    model.loss_function = causal_lm_loss
    if checkpointing:  # the halo all-gather and the all-to-alls run again in the recompute
        model.activation_checkpointing_enable({"use_reentrant": False})
        model.train()
    seen: dict[str, set] = {"layers": set(), "mixer": set()}

    def tokens(where):
        def hook(m, args, kwargs, *out):
            seen[where].add(kwargs.get("hidden_states", args[0] if args else None).shape[1])

        return hook

    for layer in model.model.layers:
        layer.register_forward_hook(tokens("layers"), with_kwargs=True)
        for mixer in filter(linear_attention.is_linear_mixer, layer.modules()):
            mixer.register_forward_pre_hook(tokens("mixer"), with_kwargs=True)
    calls = ulysses_attn.state.STATE.attention_calls
    shard = shard_batch(batch)
    out = model(**shard)
    out.loss.backward()
    calls = ulysses_attn.state.STATE.attention_calls - calls

    seq = batch["input_ids"].shape[1]
    logits = all_gather_seq(out.logits.detach(), sp.group)[:, :seq]
    keep = batch.get("attention_mask", torch.ones_like(batch["input_ids"])).bool()
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    floor = GRAD_FLOOR * max(g.norm().item() for g in ref_grads.values()) if dtype != torch.float64 else 0.0
    grads = {}
    for n, p in model.named_parameters():
        g = p.grad.clone()
        dist.all_reduce(g)
        grads[n] = ((g / world - ref_grads[n]).norm() / max(ref_grads[n].norm().item(), floor)).item()
    return {
        "shard_seq": shard["input_ids"].shape[1],
        "seen": seen,
        "mixing_calls": calls,  # attention + delta-rule + short-conv calls through the package
        "exact_layers": sum(linear_attention.is_exact(m) for m in model.modules()),
        "loss": abs(out.loss.item() - ref_out.loss.item()) / abs(ref_out.loss.item()),
        "logits": rel_err(logits[keep], ref_out.logits.detach()[keep]),
        "grads": grads,
    }


def _models_worker(rank, world):
    ulysses_attn.init_sequence_parallel(world)
    return {
        (mt, kind, dtype): _parity(mt, kind, world, dtype)
        for dtype in (torch.float64, torch.float32)
        for mt in MODELS
        for kind in ("plain", "padded")
    } | {("qwen3_next", "plain", "checkpointing"): _parity("qwen3_next", "plain", world, torch.float32, True)}


@pytest.mark.parametrize("world", [2, 4])
def test_gated_delta_net_models_sp_equal_one_process(world):
    """Logits, loss and every gradient (conv weights, A_log, dt_bias included) equal one process; the
    decoder and GDN layers saw ceil(S/P) tokens; both GDN layers ran the package's delta rule."""
    for result in run_distributed(_models_worker, world):
        for (mt, kind, dtype), r in result.items():
            seq = _batch(kind)["input_ids"].shape[1]
            assert r["shard_seq"] == -(-seq // world)
            assert r["seen"] == {"layers": {r["shard_seq"]}, "mixer": {r["shard_seq"]}}, (mt, kind, r["seen"])
            recomputed = 2 if dtype == "checkpointing" else 1
            assert r["exact_layers"] == 2 and r["mixing_calls"] == recomputed * len(LAYERS), (mt, kind, r)
            rtol = RTOL.get(dtype, RTOL[torch.float32])
            assert r["loss"] < rtol and r["logits"] < rtol, (mt, kind, dtype, r["loss"], r["logits"])
            bad = {n: e for n, e in r["grads"].items() if not e < rtol}
            assert not bad, (mt, kind, dtype, bad)
            assert any("A_log" in n for n in r["grads"]) and any("conv1d" in n for n in r["grads"])


def _short_conv_worker(rank, world):
    ulysses_attn.init_sequence_parallel(world)
    return {(mt, kind, dtype): _parity(mt, kind, world, dtype)
            for dtype in (torch.float64, torch.float32) for mt in SHORT_CONV_MODELS for kind in ("plain", "padded")}


@pytest.mark.parametrize("world", [2, 4])
def test_short_conv_models_sp_equal_one_process(world):
    """LFM2 / LFM2-MoE / LFM3 (short-conv + attention layers): logits, loss and every gradient (the
    conv weights included) equal one process; the decoder and short-conv layers saw ceil(S/P) tokens;
    both short-conv layers ran the package's halo convolution (each counted as its layer's mixing call)."""
    for result in run_distributed(_short_conv_worker, world):
        for (mt, kind, dtype), r in result.items():
            assert r["shard_seq"] == -(-_batch(kind)["input_ids"].shape[1] // world)
            assert r["seen"] == {"layers": {r["shard_seq"]}, "mixer": {r["shard_seq"]}}, (mt, kind, r["seen"])
            assert r["exact_layers"] == 2 and r["mixing_calls"] == len(SHORT_CONV_LAYERS), (mt, kind, r)
            assert r["loss"] < RTOL[dtype] and r["logits"] < RTOL[dtype], (mt, kind, dtype, r["loss"], r["logits"])
            bad = {n: e for n, e in r["grads"].items() if not e < RTOL[dtype]}
            assert not bad, (mt, kind, dtype, bad)
            assert any("conv.weight" in n for n in r["grads"])


# --- refusals, and generation without SP -------------------------------------------------------------------


def _refusal_worker(rank, world):
    ulysses_attn.init_sequence_parallel(world)
    cfg = _config("qwen3_next")
    model = build(cfg, "ulysses_flash")
    lens = (40, 35)
    ids = torch.randint(3, VOCAB - 3, (1, sum(lens)), generator=torch.Generator().manual_seed(0))
    packed = {"input_ids": ids, "position_ids": torch.cat([torch.arange(n) for n in lens])[None], "use_cache": False}
    messages = {}
    shard = shard_batch(packed)  # adds cu_seq_lens_q/k
    bare = {k: v for k, v in shard.items() if not k.startswith(("cu_seq_lens", "max_length"))}
    cases = {
        "packed": shard,
        "packed positions only": bare,
        "cache": {**shard_batch({"input_ids": ids}), "use_cache": True},
    }
    for name, inputs in cases.items():
        with pytest.raises(NotImplementedError) as info:
            model(**inputs)
        messages[name] = str(info.value)
    for kind in ("lfm2", "bamba"):
        other = build(_config(kind), "ulysses_flash")
        for name, inputs in ((f"{kind} packed", shard), (f"{kind} cache", cases["cache"])):
            with pytest.raises(NotImplementedError) as info:
                other(**inputs)
            messages[name] = str(info.value)
    odd = build(_config("qwen3_next", linear_num_value_heads=3, linear_num_key_heads=1), "ulysses_flash")
    with pytest.raises(NotImplementedError) as info:
        odd(**shard_batch({"input_ids": ids, "use_cache": False}))
    messages["heads"] = str(info.value)

    # generation with a cache stays unsharded and exact (the same tokens as the stock model)
    prompt = ids[:, :9]
    ref = build(cfg, "sdpa")
    with torch.no_grad(), ulysses_attn.unsharded():
        ours = model.generate(prompt, max_new_tokens=6, do_sample=False)
        cached = model(input_ids=prompt, use_cache=True).logits
    theirs = ref.generate(prompt, max_new_tokens=6, do_sample=False)
    same_logits = rel_err(cached, ref(input_ids=prompt, use_cache=True).logits.detach())
    return messages, torch.equal(ours, theirs), same_logits


def test_packed_and_cached_forwards_are_refused():
    for messages, same_tokens, logits_err in run_distributed(_refusal_worker, 2):
        for name in ("packed", "packed positions only", "lfm2 packed", "bamba packed"):
            assert "packed rows" in messages[name] and "sp_size=1" in messages[name], messages[name]
        for name in ("cache", "lfm2 cache", "bamba cache"):
            assert "use_cache=False" in messages[name] and "unsharded()" in messages[name], messages[name]
        assert "3 value heads" in messages["heads"] and "size 2" in messages["heads"], messages["heads"]
        assert same_tokens and logits_err < 1e-6


def _mamba2_worker(rank, world):
    ulysses_attn.init_sequence_parallel(world)
    # training mode with checkpointing: the mixer first asks the fused conv+scan kernel (off under SP)
    return {(mt, kind, dtype): _parity(mt, kind, world, dtype)
            for dtype in (torch.float64, torch.float32) for mt in MAMBA_MODELS for kind in ("plain", "padded")
            } | {("bamba", "plain", "checkpointing"): _parity("bamba", "plain", world, torch.float32, True)}


@pytest.mark.parametrize("world", [2, 4])
def test_mamba2_hybrids_sp_equal_one_process(world):
    """Bamba, Granite-4 hybrid (granitemoehybrid), Nemotron-H, Falcon-H1 and Zamba2 (Mamba-2 +
    attention layers; one B/C group, so it is replicated over the ranks): logits, loss and every gradient (conv weights,
    ``A_log``, ``D``, ``dt_bias`` included) equal one process; decoder and mixer layers saw ceil(S/P)
    tokens; both Mamba-2 layers ran the package's scan. transformers' torch scan computes in fp32 even
    for an fp64 model, so both dtypes are held to fp32's 1e-5 (observed: fp64 <= 1.4e-6, on A_log)."""
    tol = RTOL[torch.float32]
    for result in run_distributed(_mamba2_worker, world):
        for (mt, kind, dtype), r in result.items():
            assert r["shard_seq"] == -(-_batch(kind)["input_ids"].shape[1] // world)
            assert r["seen"] == {"layers": {r["shard_seq"]}, "mixer": {r["shard_seq"]}}, (mt, kind, r["seen"])
            calls = 4 if mt == "falcon_h1" else 3  # 2 scans + 1 attention (Falcon-H1: 2 + 2, side by side)
            calls *= 2 if dtype == "checkpointing" else 1  # the recompute runs them again
            assert r["exact_layers"] == 2 and r["mixing_calls"] == calls, (mt, kind, r)
            assert r["loss"] < tol and r["logits"] < tol, (mt, kind, dtype, r["loss"], r["logits"])
            bad = {n: e for n, e in r["grads"].items() if not e < tol}
            assert not bad, (mt, kind, dtype, bad)
            params = (".A_log", ".D", ".dt_bias", ".conv1d.weight")
            assert all(any(n.endswith(p) for n in r["grads"]) for p in params), mt
