"""Data for SP (``ulysses_attn.data``): ``shard_batch`` (padding, global positions, full-sequence
label shift, whole-batch keys), ``UlyssesCollator`` around transformers' collators, and
``UlyssesSampler`` over the data-parallel groups -- with the process-wide handle of a real 4-process
run too."""

from __future__ import annotations

import pickle

import pytest
import torch
from distributed import run_distributed
from helpers import fake_sp, packed_positions
from tiny_models import VOCAB

import ulysses_attn
from ulysses_attn import SequenceParallel, UlyssesCollator, UlyssesSampler, shard_batch

# ================================================================================================
# shard_batch
# ================================================================================================


def _batch(bsz=2, seq=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (bsz, seq), generator=g)
    mask = torch.ones(bsz, seq, dtype=torch.long)
    mask[1, seq - 3 :] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


WHOLE_BATCH = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def _check_whole_batch_keys(shard, cu, max_len):
    """A shard may carry cu_seq_lens/max_length (all or none); if it does they must describe the
    documents of the full, padded sequence, never the caller's stale values."""
    present = [k for k in WHOLE_BATCH if k in shard]
    assert present in ([], list(WHOLE_BATCH)), present
    if present:
        assert shard["cu_seq_lens_q"].tolist() == cu and shard["cu_seq_lens_k"].tolist() == cu
        assert int(shard["max_length_q"]) == max_len and int(shard["max_length_k"]) == max_len


def _shards(batch, P, **kw):
    return [shard_batch(batch, sp=fake_sp(P, r), **kw) for r in range(P)]


def test_shard_batch_pads_and_shifts_on_full_sequence():
    batch = _batch()
    P, seq, padded = 4, 10, 12
    shards = _shards(batch, P, pad_token_id=7)
    for sh in shards:
        assert set(sh) == {"input_ids", "attention_mask", "labels", "shift_labels", "position_ids"}
        assert all(v.shape == (2, padded // P) for v in sh.values())
        assert all(v.is_contiguous() for v in sh.values())
    full = {k: torch.cat([sh[k] for sh in shards], dim=1) for k in shards[0]}
    assert torch.equal(full["input_ids"][:, :seq], batch["input_ids"]) and full["input_ids"][:, seq:].eq(7).all()
    assert torch.equal(full["attention_mask"][:, :seq], batch["attention_mask"])
    assert full["attention_mask"][:, seq:].eq(0).all()
    assert torch.equal(full["labels"][:, :seq], batch["labels"]) and full["labels"][:, seq:].eq(-100).all()
    assert torch.equal(full["position_ids"], torch.arange(padded).expand(2, padded))  # positions continue
    # shift_labels: token t predicts label t+1 of the FULL sequence, including across shard boundaries
    expect = torch.full((2, padded), -100)
    expect[:, : seq - 1] = batch["labels"][:, 1:]
    assert torch.equal(full["shift_labels"], expect)
    local = padded // P
    for r in range(P - 1):  # the last target of every shard but the last is the next shard's first label
        assert torch.equal(shards[r]["shift_labels"][0, -1], batch["labels"][0, (r + 1) * local])
        assert shards[r]["shift_labels"][0, -1] != -100
    # input is not modified
    assert batch.keys() == {"input_ids", "attention_mask", "labels"} and batch["input_ids"].shape == (2, seq)


def test_shard_batch_keeps_given_positions_and_shift_labels():
    pos = packed_positions((4, 5))  # [1, 9]
    ids = torch.arange(1, 10)[None]
    shift = torch.arange(100, 109)[None]
    embeds = torch.randn(1, 9, 6)
    batch = {
        "input_ids": ids,
        "position_ids": pos,
        "shift_labels": shift,
        "inputs_embeds": embeds,
        "cu_seq_lens_q": torch.tensor([0, 4, 9]),
        "cu_seq_lens_k": torch.tensor([0, 4, 9]),
        "max_length_q": 5,
        "max_length_k": 5,
        "seq_idx": torch.tensor([[0] * 4 + [1] * 5]),
        "num_items_in_batch": torch.tensor(7),
        "meta": ["not", "a", "tensor"],
    }
    shards = _shards(batch, 2)
    for sh in shards:
        # whole-batch keys of the caller's (unpadded) batch are never passed on as they were
        assert "seq_idx" not in sh
        _check_whole_batch_keys(sh, cu=[0, 4, 10], max_len=6)
        assert sh["meta"] == ["not", "a", "tensor"] and sh["num_items_in_batch"].item() == 7
        assert "labels" not in sh
    full = {
        k: torch.cat([sh[k] for sh in shards], dim=1)
        for k in ("input_ids", "position_ids", "shift_labels", "inputs_embeds")
    }
    assert full["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2, 3, 4, 5]]  # the last document continues
    assert full["shift_labels"].tolist() == [list(range(100, 109)) + [-100]]  # given shift_labels kept as is
    assert torch.equal(full["inputs_embeds"][:, :9], embeds) and full["inputs_embeds"][:, 9:].eq(0).all()
    assert full["input_ids"].tolist() == [list(range(1, 10)) + [0]]


def test_shard_batch_broadcast_positions_and_no_sp():
    batch = _batch(bsz=3, seq=8)
    batch["position_ids"] = torch.arange(8)[None]  # [1, S] for the whole batch
    out = shard_batch(batch)  # no SP initialised: same code path, nothing sharded
    assert out["input_ids"].shape == (3, 8) and out["position_ids"].shape == (3, 8)
    assert torch.equal(out["position_ids"], torch.arange(8).expand(3, 8))
    assert (
        torch.equal(out["shift_labels"][:, :-1], batch["labels"][:, 1:]) and out["shift_labels"][:, -1].eq(-100).all()
    )
    shards = _shards(batch, 2)
    assert [s["position_ids"].tolist() for s in shards] == [[list(range(4))] * 3, [list(range(4, 8))] * 3]
    with pytest.raises(ValueError, match="sequence length"):
        shard_batch({"attention_mask": torch.ones(1, 4)})


# ================================================================================================
# collators
# ================================================================================================


def _features(lens, seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = []
    for n in lens:
        ids = torch.randint(5, 50, (n,), generator=g).tolist()
        feats.append({"input_ids": ids, "labels": list(ids)})
    return feats


def test_collator_with_flattening():
    from transformers import DataCollatorWithFlattening

    base = DataCollatorWithFlattening(return_flash_attn_kwargs=True, return_seq_idx=True)
    feats = _features((5, 3, 6))
    flat = base(feats)
    assert flat["input_ids"].shape == (1, 14) and "cu_seq_lens_q" in flat
    P = 4
    shards = [UlyssesCollator(base, sp=fake_sp(P, r))(feats) for r in range(P)]
    for sh in shards:
        assert set(sh) - set(WHOLE_BATCH) == {"input_ids", "labels", "position_ids", "shift_labels"}
        _check_whole_batch_keys(sh, cu=[0, 5, 8, 16], max_len=8)  # the last document runs into the padding
        assert sh["input_ids"].shape == (1, 4)
    full = {k: torch.cat([sh[k] for sh in shards], 1) for k in shards[0] if k not in WHOLE_BATCH}
    assert full["input_ids"].tolist() == [flat["input_ids"][0].tolist() + [0, 0]]
    assert full["labels"].tolist() == [flat["labels"][0].tolist() + [-100, -100]]
    assert full["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3, 4, 5, 6, 7]]
    shift = full["shift_labels"][0].tolist()
    ids = flat["input_ids"][0].tolist()
    # within a document the target is the next token; at a document's end nothing (-100)
    assert shift[:4] == ids[1:5] and shift[4] == -100 and shift[5:7] == ids[6:8] and shift[7] == -100
    assert shift[8:13] == ids[9:14] and shift[13:] == [-100, -100, -100]


def _tiny_tokenizer(pad_id=3):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(60) if i not in (0, pad_id)}
    vocab.update({"[UNK]": 0, "[PAD]": pad_id})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")


def test_collator_with_seq2seq_collator():
    from transformers import DataCollatorForSeq2Seq

    tok = _tiny_tokenizer(pad_id=3)
    assert tok.pad_token_id == 3
    base = DataCollatorForSeq2Seq(tok, padding=True)
    feats = _features((5, 3))
    ref = base(feats)
    P = 2
    collators = [UlyssesCollator(base, sp=fake_sp(P, r)) for r in range(P)]
    assert collators[0].pad_token_id == 3  # taken from the wrapped collator's tokenizer
    assert collators[0].tokenizer is tok and collators[0].padding is True  # behaves like the wrapped collator
    shards = [c(feats) for c in collators]
    full = {k: torch.cat([sh[k] for sh in shards], 1) for k in shards[0]}
    assert full["input_ids"].shape == (2, 6)
    assert torch.equal(full["input_ids"][:, :5], ref["input_ids"]) and full["input_ids"][:, 5].eq(3).all()
    assert full["input_ids"][1, 3:].eq(3).all()
    assert full["attention_mask"].tolist() == [[1] * 5 + [0], [1] * 3 + [0] * 3]
    assert full["labels"][1, 3:].eq(-100).all() and full["labels"][:, 5].eq(-100).all()
    assert torch.equal(full["shift_labels"][:, :4], ref["labels"][:, 1:])
    assert full["position_ids"].tolist() == [list(range(6))] * 2
    assert UlyssesCollator(base, pad_token_id=9).pad_token_id == 9  # an explicit pad id wins
    with pytest.raises(AttributeError):
        collators[0].no_such_attribute


def test_collator_default_base():
    feats = [{"input_ids": [1, 2, 3, 4, 5], "labels": [1, 2, 3, 4, 5]}] * 2
    shards = [UlyssesCollator(sp=fake_sp(2, r))(feats) for r in range(2)]
    assert shards[0]["input_ids"].tolist() == [[1, 2, 3]] * 2 and shards[1]["input_ids"].tolist() == [[4, 5, 0]] * 2
    assert (
        shards[0]["shift_labels"].tolist() == [[2, 3, 4]] * 2
        and shards[1]["shift_labels"].tolist() == [[5, -100, -100]] * 2
    )


def _equal_batches(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a)


def test_collator_pickles_for_dataloader_workers():
    """A DataLoader with workers started by spawn/forkserver pickles its collate_fn: the unpickled
    collator must shard every batch exactly as the original, with the process-wide handle (sp=None)
    and with a handle of its own."""
    from transformers import DataCollatorForSeq2Seq

    base = DataCollatorForSeq2Seq(_tiny_tokenizer(pad_id=3), padding=True)
    feats = _features((5, 3, 7))
    handle = SequenceParallel(size=2, rank=1, group=None, dp_size=2, dp_rank=1, dp_group=None, ranks=(2, 3))
    for sp, local_seq in ((None, 7), (handle, 4)):  # no SP: the whole (padded) batch; P = 2: half of 8 tokens
        collator = UlyssesCollator(base, sp=sp)
        clone = pickle.loads(pickle.dumps(collator))
        assert clone is not collator and clone.sp == sp and clone.pad_token_id == collator.pad_token_id == 3
        want, got = collator(feats), clone(feats)
        assert want["input_ids"].shape == (3, local_seq), want["input_ids"].shape
        assert _equal_batches(got, want), sp
        if sp is not None:  # this rank's half: the second shard of the padded sequence
            assert got["position_ids"].tolist() == [[4, 5, 6, 7]] * 3


# ================================================================================================
# sampler
# ================================================================================================


def test_sampler_groups():
    data = list(range(20))
    orders = {
        (dp, sp): list(UlyssesSampler(data, seed=3, sp=fake_sp(2, sp, dp_size=2, dp_rank=dp)))
        for dp in (0, 1)
        for sp in (0, 1)
    }
    assert orders[0, 0] == orders[0, 1] and orders[1, 0] == orders[1, 1]  # one SP group: same samples, same order
    assert len(orders[0, 0]) == 10 and not set(orders[0, 0]) & set(orders[1, 0])  # groups disjoint
    assert sorted(orders[0, 0] + orders[1, 0]) == data
    assert orders[0, 0] != sorted(orders[0, 0])  # shuffled


def test_sampler_epochs_are_deterministic():
    data = list(range(50))

    def order(epoch, dp_rank=0, seed=3):
        s = UlyssesSampler(data, seed=seed, sp=fake_sp(4, 1, dp_size=2, dp_rank=dp_rank))
        s.set_epoch(epoch)
        return list(s)

    assert order(0) == order(0) and order(1) == order(1)  # same epoch, fresh sampler: same order (resume)
    assert order(0) != order(1)
    assert order(0, seed=4) != order(0)
    assert not set(order(1, 0)) & set(order(1, 1))
    unshuffled = UlyssesSampler(data, shuffle=False, sp=fake_sp(4, 1, dp_size=2, dp_rank=1))
    assert list(unshuffled) == list(range(1, 50, 2))


def test_sampler_without_sp_is_one_replica():
    assert list(UlyssesSampler(list(range(6)), shuffle=False)) == list(range(6))  # no SP: one replica
    ulysses_attn.init_sequence_parallel(1)
    s = UlyssesSampler(list(range(6)), shuffle=False)
    assert (s.num_replicas, s.rank) == (1, 0) and list(s) == list(range(6))


# ================================================================================================
# the process-wide handle of a real run: 4 processes (gloo), SP groups (0, 1), (2, 3); DP 2
# ================================================================================================

DATA = list(range(24))
FEATURES = [{"input_ids": [1, 2, 3, 4, 5], "labels": [1, 2, 3, 4, 5]}] * 2


def _process_wide_handle_worker(rank, world):
    from torch.utils.data import DistributedSampler

    sp = ulysses_attn.init_sequence_parallel(2)
    res = {
        "handle": (sp.size, sp.rank, sp.dp_size, sp.dp_rank),
        "sampler": list(UlyssesSampler(DATA, seed=3)),  # no sp argument: the process-wide handle
        "dp_group_sampler": list(DistributedSampler(DATA, num_replicas=2, rank=rank // 2, seed=3)),
        "per_rank_sampler": list(DistributedSampler(DATA, seed=3)),  # torch.distributed's world and rank
        "collated": UlyssesCollator()(FEATURES),  # no sp argument either
    }
    collator = UlyssesCollator(sp=sp)  # what the Trainer integration attaches: the real handle
    implicit = UlyssesCollator()  # resolves the process-wide handle when pickled
    try:
        clones = [pickle.loads(pickle.dumps(c)) for c in (collator, implicit)]
        want = collator(FEATURES)
        ulysses_attn.state.STATE.sp = None  # as in a spawned DataLoader worker: no process-wide handle
        res["pickled"] = all(_equal_batches(clone(FEATURES), want) for clone in clones)
        res["unpickled_groups"] = [(c.sp.group, c.sp.dp_group, c.sp.ranks) for c in clones]
    except Exception as e:  # noqa: BLE001 - reported by the test
        res["pickled"] = f"{type(e).__name__}: {e}"
    finally:
        ulysses_attn.state.STATE.sp = sp
    return res


@pytest.fixture(scope="module")
def real_groups():
    """One 4-process run for the checks below (spawns are expensive on CI)."""
    return run_distributed(_process_wide_handle_worker, 4)


@pytest.mark.timeout(300)
def test_sampler_uses_process_wide_handle(real_groups):
    """Without an sp argument the sampler shards over the DP groups of the process-wide handle: its
    indices are those of a DistributedSampler over the DP groups, not over the 4 ranks."""
    for rank, r in enumerate(real_groups):
        assert r["handle"] == (2, rank % 2, 2, rank // 2)
        assert r["sampler"] == r["dp_group_sampler"], rank
        assert r["sampler"] != r["per_rank_sampler"] and len(r["per_rank_sampler"]) == len(DATA) // 4
    orders = [r["sampler"] for r in real_groups]
    assert orders[0] == orders[1] and orders[2] == orders[3]  # one SP group: the same samples, in order
    assert sorted(orders[0] + orders[2]) == DATA  # the DP groups share the data out
    per_rank = [r["per_rank_sampler"] for r in real_groups]
    assert per_rank[0] != per_rank[1]  # what a per-rank sampler would have given the ranks of one SP group


@pytest.mark.timeout(300)
def test_collator_uses_process_wide_handle(real_groups):
    for rank, r in enumerate(real_groups):
        want = [[1, 2, 3]] * 2 if rank % 2 == 0 else [[4, 5, 0]] * 2  # this rank's half of the padded row
        assert r["collated"]["input_ids"].tolist() == want, rank
        assert r["collated"]["position_ids"].tolist() == [[0, 1, 2]] * 2 if rank % 2 == 0 else [[3, 4, 5]] * 2


@pytest.mark.timeout(300)
def test_collator_with_a_real_handle_pickles_for_dataloader_workers(real_groups):
    """A spawn/forkserver DataLoader worker gets a pickled collator and no process-wide handle: the
    copy (of an explicit handle, or of sp=None resolved at pickling) shards exactly as the original,
    without the process groups (which cannot be pickled and which a worker never uses)."""
    for rank, r in enumerate(real_groups):
        assert r["pickled"] is True, r["pickled"]
        ranks = (0, 1) if rank < 2 else (2, 3)
        assert r["unpickled_groups"] == [(None, None, ranks)] * 2
