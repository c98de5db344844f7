"""The logit transform after the LM head: known ones applied by the chunked losses, any other one
detected by the probe so that the model's own forward computes the loss (never a different number)."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

from tiny_models import REFERENCE_ATTN, VOCAB, build
from ulysses_attn import MemoryOptions, configure_memory
from ulysses_attn.head import LogitTransform, checked_logit_transform
from ulysses_attn.loss import chunked_causal_lm_loss, chunked_logit_sums, chunked_row_log_probs
from zoo import build as build_zoo
from zoo import tiny_config


def _batch(seq=24):
    ids = torch.randint(1, VOCAB, (2, seq), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[1, :5] = -100
    return {"input_ids": ids, "labels": labels}


def _loss_and_grads(model, batch):
    model.train()
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(
    "model_type,overrides,expected",
    [
        ("llama", {}, LogitTransform()),
        ("gemma2", {}, LogitTransform(softcap=30.0)),
        ("cohere", {}, LogitTransform(scale=0.0625)),
        ("granite", {"logits_scaling": 4.0}, LogitTransform(scale=0.25)),  # Granite divides
    ],
)
def test_known_transforms_pass_the_probe(model_type, overrides, expected):
    cfg = tiny_config(model_type)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    model = build_zoo(cfg, "eager")
    transform = checked_logit_transform(model)
    assert transform == expected
    assert model.training is False  # the probe restores every module's mode


@pytest.mark.parametrize("model_type", ["modernbert-decoder", "inkling_text", "recurrent_gemma"])
def test_an_unknown_transform_makes_the_chunked_loss_use_the_models_own_forward(model_type, caplog):
    """modernbert-decoder scores through a prediction head before its output embeddings, inkling
    divides the hidden states by a muP multiplier, recurrent_gemma soft-caps with `logits_soft_cap`:
    the chunked loss, which calls the head itself, would give another loss (checked below); with the
    probe it falls back to the model's forward and equals it."""
    ref = build_zoo(tiny_config(model_type), "eager")
    model = copy.deepcopy(ref)
    vocab = ref.config.get_text_config().vocab_size
    ids = torch.randint(1, vocab, (2, 24), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids.clone(), "use_cache": False}
    ref_loss, ref_grads = _loss_and_grads(ref, batch)

    with torch.no_grad():  # what the chunked loss gave without the probe
        hidden = ref.base_model(input_ids=ids, use_cache=False).last_hidden_state
        unchecked = chunked_causal_lm_loss(hidden, ref.get_output_embeddings(), labels=ids)
    assert abs(unchecked.item() - ref_loss.item()) > 1e-5 * ref_loss.item()  # fp32 noise: ~1e-7

    configure_memory(model, MemoryOptions(chunked_loss=True, loss_chunk_tokens=7))
    with caplog.at_level(logging.WARNING, logger="ulysses_attn"):
        loss, grads = _loss_and_grads(model, batch)
    assert checked_logit_transform(model) is None
    assert "the model's own forward computes them instead" in caplog.text
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-7)


def test_a_failing_probe_is_reported_as_unchecked():
    model = build("llama", REFERENCE_ATTN["llama"])

    def broken_forward(**kwargs):
        raise RuntimeError("this forward needs pixel_values")

    assert checked_logit_transform(model, broken_forward) is None
    assert checked_logit_transform(model) is None  # cached per model


def test_row_log_probs_and_logit_sums_apply_the_transform():
    model = build("gemma2", REFERENCE_ATTN["gemma2"])
    transform = checked_logit_transform(model)
    assert transform == LogitTransform(softcap=3.0)
    ids = _batch()["input_ids"]
    hidden = model.base_model(input_ids=ids).last_hidden_state
    targets = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], dim=1)
    targets[0, :4] = -100
    logits = model(input_ids=ids).logits.float()
    expected = logits.log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    expected = expected.masked_fill(targets == -100, 0).sum(-1)
    head = model.get_output_embeddings()
    got = chunked_row_log_probs(hidden, head, targets, chunk_tokens=5, transform=transform)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    (got.sum() - expected.sum()).abs().backward()  # a graph through the transformed chunks
    sums = chunked_logit_sums(hidden.reshape(-1, hidden.shape[-1]), head, chunk_tokens=5, transform=transform)
    torch.testing.assert_close(sums, logits.reshape(-1, logits.shape[-1]).sum(-1), rtol=1e-5, atol=1e-5)
    untransformed = chunked_row_log_probs(hidden, head, targets, chunk_tokens=5)
    assert (untransformed - expected).abs().max() > 1e-3  # the transform matters here
