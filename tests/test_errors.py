"""Every user error gives a clear exception on every rank, never a hang (real gloo processes).

The multi-process checks run together in one 4-process spawn (imports cost several seconds per
process on CI): each check is caught inside the worker and its (type, message) returned, so the
test asserts that *every* rank raised and that the message says what to do.
"""

from __future__ import annotations

import pytest
import torch

import ulysses_attn
from distributed import run_distributed
from tiny_models import VOCAB, build
from ulysses_attn.attention import check_heads, kv_replication, padded_heads, ulysses_flash_attention
from ulysses_attn.loss import causal_lm_loss
from ulysses_attn.state import STATE


def _catch(fn):
    """Run ``fn``; return ``None`` on success or ``(exception type name, message)``."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the type is asserted by the test
        return type(e).__name__, str(e)
    return None


def _ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------
# single process
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [0, -2, 2.0, "2", None])
def test_init_rejects_non_positive_or_non_int_size(bad):
    with pytest.raises(ValueError, match="sp_size must be a positive integer"):
        ulysses_attn.init_sequence_parallel(bad)
    assert ulysses_attn.get_sequence_parallel() is None


@pytest.mark.parametrize("source,value", [("argument", 2.5), ("argument", 0), ("env", "two"), ("env", "-1"),
                                          ("config", "auto")])
def test_sp_size_from_each_source_must_be_a_positive_integer(tmp_path, monkeypatch, source, value):
    import json

    from ulysses_attn.integrations.trainer import resolve_sp_size

    monkeypatch.delenv("ULYSSES_SP_SIZE", raising=False)
    monkeypatch.delenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", raising=False)
    named = {"argument": "sp_size", "env": "ULYSSES_SP_SIZE", "config": "sequence_parallel_size in"}[source]
    if source == "env":
        monkeypatch.setenv("ULYSSES_SP_SIZE", value)
    if source == "config":
        (tmp_path / "ds.json").write_text(json.dumps({"sequence_parallel_size": value}))
        monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(tmp_path / "ds.json"))
    with pytest.raises(ValueError, match=f"{named}.* must be a positive integer .*got {value!r}"):
        resolve_sp_size(value if source == "argument" else None)


def test_sp_size_missing_or_conflicting(tmp_path, monkeypatch):
    import json

    from ulysses_attn.integrations.trainer import resolve_sp_size

    monkeypatch.delenv("ULYSSES_SP_SIZE", raising=False)
    monkeypatch.delenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", raising=False)
    with pytest.raises(ValueError, match="No sequence-parallel size given.*ULYSSES_SP_SIZE"):
        resolve_sp_size()
    (tmp_path / "ds.json").write_text(json.dumps({"sequence_parallel_size": 4}))
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(tmp_path / "ds.json"))
    monkeypatch.setenv("ULYSSES_SP_SIZE", "4")
    assert resolve_sp_size() == 4 == resolve_sp_size(4)
    with pytest.raises(ValueError, match="Conflicting sequence-parallel sizes: the sp_size argument=2, ULYSSES_SP_SIZE=4"):
        resolve_sp_size(2)


def test_init_without_torch_distributed():
    assert not torch.distributed.is_initialized()
    with pytest.raises(RuntimeError, match="torch.distributed") as info:
        ulysses_attn.init_sequence_parallel(2)
    assert "torchrun" in str(info.value) and "size 2" in str(info.value)
    assert ulysses_attn.get_sequence_parallel() is None
    # size 1 is "no sequence parallelism" and needs no process group
    sp = ulysses_attn.init_sequence_parallel(1)
    assert (sp.size, sp.rank, sp.dp_size, sp.dp_rank) == (1, 0, 1, 0)
    assert ulysses_attn.get_sequence_parallel() is sp


def test_unknown_forced_kernel():
    with pytest.raises(ValueError, match="nope") as info:
        ulysses_attn.set_kernel("nope")
    for name in ("flash_attn", "sdpa", "torch_varlen", "reference"):
        assert name in str(info.value)
    assert STATE.forced_kernel is None  # a rejected name does not stick
    ulysses_attn.set_kernel("sdpa")
    with pytest.raises(ValueError, match="nope"):
        ulysses_attn.set_kernel("nope")
    assert STATE.forced_kernel == "sdpa"  # nor does it replace the kernel forced before


def test_unknown_kernel_from_environment(monkeypatch):
    monkeypatch.setenv("ULYSSES_ATTN_KERNEL", "nope")
    model = build("llama", "ulysses_flash")
    with pytest.raises(ValueError, match="ULYSSES_ATTN_KERNEL='nope'"):
        model(input_ids=_ids(8), use_cache=False)


def test_forced_kernel_not_available_on_cpu():
    ulysses_attn.set_kernel("flash_attn")
    model = build("llama", "ulysses_flash")
    with pytest.raises(RuntimeError, match="not available on cpu"):
        model(input_ids=_ids(8), use_cache=False)


def test_forced_sdpa_rejects_sliding_window():
    ids = _ids(12)
    packed = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3]])
    ulysses_attn.set_kernel("sdpa")
    model = build("llama", "ulysses_flash")
    model(input_ids=ids, use_cache=False)  # dense and packed are fine with sdpa
    model(input_ids=ids, position_ids=packed, use_cache=False)
    mistral = build("mistral", "ulysses_flash")  # sliding window 7 < 12 tokens
    with pytest.raises(ValueError, match="'sdpa' cannot run this call") as info:
        mistral(input_ids=ids, use_cache=False)
    assert "sliding_window=7" in str(info.value)
    ulysses_attn.set_kernel("reference")  # the reference kernel runs everything
    mistral(input_ids=ids, use_cache=False)


def test_loss_needs_labels():
    logits = torch.randn(1, 5, VOCAB)
    with pytest.raises(ValueError, match="labels or shift_labels"):
        causal_lm_loss(logits)


def test_attention_function_rejects_unsupported_inputs():
    module = torch.nn.Module()
    q = k = v = torch.randn(1, 4, 8, 8)
    with pytest.raises(ValueError, match="2D padding mask"):
        ulysses_flash_attention(module, q, k, v, torch.ones(1, 1, 8, 8, dtype=torch.bool))
    ulysses_attn.set_kernel("sdpa")  # attention sinks (gpt-oss) need a kernel that applies them
    with pytest.raises(ValueError, match="'sdpa' cannot run this call .*attention sinks=True"):
        ulysses_flash_attention(module, q, k, v, None, s_aux=torch.zeros(4))
    ulysses_attn.set_kernel(None)
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    with pytest.raises(NotImplementedError, match="self-attention only"):
        ulysses_flash_attention(module, q, k, v, None, cu_seq_lens_q=cu, cu_seq_lens_k=torch.tensor([0, 8]))
    with pytest.raises(ValueError, match="cu_seq_lens_q ends at 10"):
        ulysses_flash_attention(module, q, k, v, None, cu_seq_lens_q=torch.tensor([0, 4, 10], dtype=torch.int32))
    # and the accepted form works: [B, S, H, D] out
    out, weights = ulysses_flash_attention(module, q, k, v, None, cu_seq_lens_q=cu, cu_seq_lens_k=cu)
    assert out.shape == (1, 8, 4, 8) and weights is None


def test_check_heads_messages():
    with pytest.raises(ValueError, match=r"num_heads \(8\) must be a multiple of num_key_value_heads \(3\)"):
        check_heads(8, 3)
    assert check_heads(8, 2) is None  # valid: no exception
    # 12 heads over 8 ranks is not an error: check_heads accepts the pair (it returns, it does not
    # raise) and the SP path pads each KV head's group of 3 query heads to 4 (16 heads), whose 4 KV
    # heads are replicated twice so that they too split over the 8 ranks (tests/test_model_parity.py)
    assert check_heads(12, 4) is None
    assert padded_heads(12, 4, 8) == (16, True) and kv_replication(16, 4, 8) == 2


# ------------------------------------------------------------------------------------------------
# 4 processes: SP size 4 (one group), then SP size 2 (two groups of 2, DP 2)
# ------------------------------------------------------------------------------------------------


def _errors_worker(rank, world):
    res = {}
    # sizes that do not divide the world
    res["init3"] = _catch(lambda: ulysses_attn.init_sequence_parallel(3))
    assert ulysses_attn.get_sequence_parallel() is None
    sp = ulysses_attn.init_sequence_parallel(world)
    res["reinit_same_is_same"] = ulysses_attn.init_sequence_parallel(world) is sp
    res["reinit_other"] = _catch(lambda: ulysses_attn.init_sequence_parallel(2))

    ulysses_attn.destroy_sequence_parallel()
    sp = ulysses_attn.init_sequence_parallel(2)  # groups {0,1} and {2,3}
    res["groups"] = (sp.size, sp.rank, sp.dp_size, sp.dp_rank, sp.ranks)
    model = build("llama", "ulysses_flash")

    # group {0,1} disagrees on the shard length (8 vs 9 tokens); group {2,3} agrees and must run
    n = 9 if rank == 1 else 8
    start = sp.rank * 8
    res["seq_disagree"] = _catch(
        lambda: model(input_ids=_ids(n), position_ids=torch.arange(start, start + n)[None], use_cache=False)
    )

    # one rank of each group has a padding mask, its peer none
    mask = {"attention_mask": torch.tensor([[1] * 6 + [0] * 2])} if sp.rank == 1 else {}
    res["mask_disagree"] = _catch(
        lambda: model(input_ids=_ids(8), position_ids=torch.arange(start, start + 8)[None], use_cache=False, **mask)
    )

    # shard-local positions: a sharded batch without its global position_ids
    full = {"input_ids": _ids(20), "labels": _ids(20)}
    shard = ulysses_attn.shard_batch(full)
    local = {k: v for k, v in shard.items() if k != "position_ids"}
    res["local_positions"] = _catch(lambda: model(input_ids=local["input_ids"], use_cache=False))
    explicit_local = torch.arange(shard["input_ids"].shape[1])[None]
    res["explicit_local_positions"] = _catch(
        lambda: model(input_ids=local["input_ids"], position_ids=explicit_local, use_cache=False)
    )

    # the same for a packed batch: shard_batch may add cu_seq_lens_q/k, the positions are still shard-local
    packed_pos = torch.cat([torch.arange(7), torch.arange(6), torch.arange(7)])[None]
    packed = ulysses_attn.shard_batch({"input_ids": _ids(20), "position_ids": packed_pos})
    no_pos = {k: v for k, v in packed.items() if k != "position_ids"}
    res["packed_has_cu"] = "cu_seq_lens_q" in packed
    res["local_positions_packed"] = _catch(lambda: model(**no_pos, use_cache=False))

    # loss without shift_labels under SP, called directly and through the model
    logits = model(input_ids=shard["input_ids"], position_ids=shard["position_ids"], use_cache=False).logits
    res["loss_labels_only"] = _catch(lambda: causal_lm_loss(logits, labels=shard["labels"]))
    model.loss_function = causal_lm_loss
    res["model_loss_labels_only"] = _catch(
        lambda: model(
            input_ids=shard["input_ids"], position_ids=shard["position_ids"], labels=shard["labels"], use_cache=False
        )
    )

    # KV-cache decoding: the prefill runs, the first decoding step must refuse
    pre = model(input_ids=shard["input_ids"], position_ids=shard["position_ids"], use_cache=True)
    res["decode"] = _catch(
        lambda: model(
            input_ids=_ids(1), position_ids=torch.tensor([[20]]), past_key_values=pre.past_key_values, use_cache=True
        )
    )

    # forcing the sdpa kernel (no sliding window) for a sliding-window model (window 7 < 20 tokens)
    mistral = build("mistral", "ulysses_flash")
    ulysses_attn.set_kernel("sdpa")
    try:
        res["forced_sdpa_window"] = _catch(lambda: mistral(**shard, use_cache=False))
    finally:
        ulysses_attn.set_kernel(None)

    # after all that, the groups still work: a correct step gives the loss of the same model in one process
    out = model(**shard, use_cache=False)
    res["loss_after"] = out.loss.item()
    res["loss_plain"] = build("llama", "sdpa")(**full, use_cache=False).loss.item()  # same seed, same weights
    return res


@pytest.fixture(scope="module")
def mp():
    """One 4-process run for all the multi-process checks below (spawns are expensive on CI)."""
    return run_distributed(_errors_worker, 4)


# the first test to use the fixture pays for the spawn; a regression into a hang fails, not blocks CI
multiprocess = pytest.mark.timeout(300)


def _every_rank(mp, key):
    return [r[key] for r in mp]


@multiprocess
def test_mp_init_size_not_dividing_world(mp):
    for r in mp:
        kind, msg = r["init3"]
        assert kind == "ValueError"
        assert "(3)" in msg and "(4)" in msg and "[1, 2, 4]" in msg, msg


@multiprocess
def test_mp_reinit(mp):
    for r in mp:
        assert r["reinit_same_is_same"] is True
        kind, msg = r["reinit_other"]
        assert kind == "RuntimeError" and "already initialised with size 4" in msg
        assert "destroy_sequence_parallel" in msg


@multiprocess
def test_mp_groups_layout(mp):
    assert _every_rank(mp, "groups") == [(2, 0, 2, 0, (0, 1)), (2, 1, 2, 0, (0, 1)), (2, 0, 2, 1, (2, 3)), (2, 1, 2, 1, (2, 3))]


@multiprocess
def test_mp_ranks_disagree(mp):
    for rank, r in enumerate(mp):
        if rank < 2:  # the group with mismatched shard lengths
            kind, msg = r["seq_disagree"]
            assert kind == "ValueError" and "disagree" in msg, msg
            assert "local_seq=8" in msg and "local_seq=9" in msg, msg
        else:  # the other group agreed and ran normally
            assert r["seq_disagree"] is None
        kind, msg = r["mask_disagree"]
        assert kind == "ValueError" and "disagree" in msg and "has_attention_mask=1" in msg, msg


@multiprocess
def test_mp_shard_local_position_ids(mp):
    for r in mp:
        for key in ("local_positions", "explicit_local_positions"):
            kind, msg = r[key]
            assert kind == "ValueError" and "position_ids" in msg and "shard" in msg, (key, msg)


@multiprocess
def test_mp_shard_local_position_ids_packed(mp):
    for r in mp:
        assert r["local_positions_packed"] is not None, f"no error (shard carried cu_seq_lens: {r['packed_has_cu']})"
        kind, msg = r["local_positions_packed"]
        assert kind == "ValueError" and "position_ids" in msg, msg


@multiprocess
def test_mp_loss_without_shift_labels(mp):
    for r in mp:
        for key in ("loss_labels_only", "model_loss_labels_only"):
            kind, msg = r[key]
            assert kind == "ValueError" and "shift_labels" in msg, (key, msg)


@multiprocess
def test_mp_kv_cache_decoding(mp):
    for kind, msg in _every_rank(mp, "decode"):
        assert kind == "NotImplementedError" and "KV cache" in msg, msg


@multiprocess
def test_mp_forced_sdpa_window(mp):
    for kind, msg in _every_rank(mp, "forced_sdpa_window"):
        assert kind == "ValueError" and "'sdpa' cannot run this call" in msg and "sliding_window=7" in msg, msg


@multiprocess
def test_mp_groups_still_work_after_errors(mp):
    for r in mp:
        assert r["loss_after"] == pytest.approx(r["loss_plain"], rel=1e-5)
