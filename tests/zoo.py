"""The model zoo: a tiny config of every causal LM in the installed transformers, and its SP parity.

``tiny_config(model_type)`` shrinks the architecture's default config (hidden size, layers, heads,
experts, vocabulary) while keeping one decoder layer of each kind it mixes (attention types, MoE /
dense, linear attention, ...). ``check_model(model_type, world)`` runs the three batches of
test_model_parity (plain, padded, packed) through the model with ``ulysses_flash`` at SP = world and
through the stock backend in one process, and returns one verdict per batch:

- ``exact``: logits, loss and every gradient agree (relative error below ``RTOL``) and the decoder
  layers saw S/P tokens;
- ``refused``: the package raised its own error (the first line is kept);
- ``wrong``: a result differs, or the decoder layers saw the whole sequence;
- ``error``: something else raised (a foreign error is a bug: the package must refuse first).

``python tests/zoo.py`` regenerates the table of docs/models-and-limits.md; tests/test_zoo.py runs
the zoo and fails when the table is stale or any verdict is ``wrong`` / ``error``.
"""

from __future__ import annotations

import contextlib
import copy
import io
import warnings

import torch

RTOL = 1e-5
GRAD_FLOOR = 1e-3  # relative to the largest parameter gradient of the model
VOCAB = 96
MAX_LAYERS = 4

# Sizes applied to every config attribute of these names that the default config has.
SIZES = {
    "vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "max_position_embeddings": 256,
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "num_experts_per_tok": 2,
    "moe_intermediate_size": 24, "shared_expert_intermediate_size": 24, "expert_intermediate_size": 24,
    "n_group": 1, "topk_group": 1, "n_shared_experts": 1,
    "q_lora_rank": 16, "kv_lora_rank": 16, "qk_rope_head_dim": 4, "qk_nope_head_dim": 4, "v_head_dim": 8,
    "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 8, "linear_value_head_dim": 8,
    "mamba_n_heads": 4, "mamba_d_head": 8, "mamba_d_state": 8, "ssm_state_size": 8, "state_size": 8,
    "mamba_expand": 1, "expand": 1, "n_groups": 1, "mamba_n_groups": 1, "time_step_rank": 4,
    "num_heads": 4, "embedding_size": 32, "rotary_dim": 8, "attention_chunk_size": 8, "ffn_hidden_size": 48,
    "global_attn_every_n_layers": 1,
}


def _per_layer_keys(cfg, n_layers: int) -> list[str]:
    """Attributes that describe each decoder layer (a list or string of length ``n_layers``)."""
    keys = []
    for k, v in vars(cfg).items():
        if k.startswith("_") or k in ("architectures",):
            continue
        if isinstance(v, (list, tuple, str)) and len(v) == n_layers and n_layers > 1:
            if isinstance(v, str) and k not in ("hybrid_override_pattern", "layers_block_type", "block_types"):
                continue
            keys.append(k)
    return keys


def _pick_layers(cfg, n_layers: int, keys: list[str]) -> list[int]:
    """One layer of each kind (the first layer whose per-layer values are new), at least two."""
    seen, picked = set(), []
    for i in range(n_layers):
        sig = tuple(repr(getattr(cfg, k)[i]) for k in keys)
        if sig not in seen:
            seen.add(sig)
            picked.append(i)
    for i in range(n_layers):
        if len(picked) >= 2:
            break
        if i not in picked:
            picked.append(i)
    return sorted(picked[:MAX_LAYERS])


def _shrink(cfg_cls, cfg) -> object:
    overrides = {}
    for k, v in SIZES.items():
        if hasattr(cfg, k) and not isinstance(getattr(cfg, k), (list, dict)):
            current = getattr(cfg, k)
            if current is None and k not in ("head_dim", "num_key_value_heads", "num_experts_per_tok"):
                continue
            overrides[k] = v
    if "qk_rope_head_dim" in overrides:  # MLA: head_dim is the RoPE part of a query head
        overrides["head_dim"] = overrides["qk_rope_head_dim"]
    n_layers = getattr(cfg, "num_hidden_layers", None)
    if isinstance(n_layers, int) and n_layers > 1:
        keys = _per_layer_keys(cfg, n_layers)
        layers = _pick_layers(cfg, n_layers, keys) if keys else [0, 1]
        overrides["num_hidden_layers"] = len(layers)
        for k in keys:
            v = getattr(cfg, k)
            picked = [v[i] for i in layers]
            overrides[k] = "".join(picked) if isinstance(v, str) else type(v)(picked)
    for k in ("sliding_window", "attention_window"):
        if isinstance(getattr(cfg, k, None), int):
            overrides[k] = 7  # shorter than the test sequences
    for k in ("first_k_dense_replace",):
        if isinstance(getattr(cfg, k, None), int):
            overrides[k] = min(getattr(cfg, k), 1)
    for k, v in vars(cfg).items():  # sub-configs (a VLM's text_config, ...)
        if hasattr(v, "to_dict") and hasattr(v, "model_type") and not k.startswith("_"):
            overrides[k] = _shrink(type(v), v)
    for k, v in vars(cfg).items():  # special token ids inside the tiny vocabulary
        if k.endswith("_token_id") and isinstance(v, int) and v >= VOCAB:
            overrides[k] = VOCAB - 1 - ("bos" in k) - 2 * ("eos" in k)
    kwargs = dict(overrides)
    try:
        return cfg_cls(**kwargs)
    except Exception:
        for k, v in kwargs.items():
            with contextlib.suppress(Exception):
                setattr(cfg, k, v)
        return cfg


def tiny_config(model_type: str):
    from transformers import AutoConfig

    cfg = AutoConfig.for_model(model_type)
    return _shrink(type(cfg), cfg)


def build(cfg, attn: str, seed: int = 0):
    from transformers import AutoModelForCausalLM

    cfg = copy.deepcopy(cfg)  # from_config keeps the object: two models must not share their attn_implementation
    torch.manual_seed(seed)
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, dtype=torch.float32)
    return model.eval()



REF_ATTN = ("sdpa", "eager")


def build_reference(cfg):
    """The model in one process under a stock backend (sdpa, else eager)."""
    errors = []
    for attn in REF_ATTN:
        try:
            return build(cfg, attn), attn
        except ValueError as e:
            errors.append(str(e).splitlines()[0])
    raise ValueError(errors[-1])


def make_batch(kind: str, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    if kind == "plain":  # one sequence, length not a multiple of P
        ids = torch.randint(3, VOCAB - 3, (1, 30), generator=g)
        return {"input_ids": ids, "labels": ids.clone()}
    if kind == "padded":  # B=3, right padded, lengths 29/21/13
        ids = torch.randint(3, VOCAB - 3, (3, 29), generator=g)
        mask = torch.zeros(3, 29, dtype=torch.long)
        for i, n in enumerate((29, 21, 13)):
            mask[i, :n] = 1
        return {"input_ids": ids * mask, "attention_mask": mask, "labels": (ids * mask).masked_fill(mask == 0, -100)}
    if kind == "packed":  # three documents in one row, position_ids restart
        lens = (11, 7, 13)
        ids = torch.randint(3, VOCAB - 3, (1, sum(lens)), generator=g)
        pos = torch.cat([torch.arange(n) for n in lens])[None]
        labels = ids.clone()
        labels[0, torch.tensor([0, 11, 18])] = -100
        return {"input_ids": ids, "position_ids": pos, "labels": labels}
    raise ValueError(kind)


KINDS = ("plain", "padded", "packed")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-12)).item()


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200] if text else ''}"


def _ours(e: BaseException) -> bool:
    """An error the package raised on purpose (its messages name it or sequence parallelism)."""
    text = str(e)
    return "ulysses" in text.lower() or "sequence parallel" in text.lower() or "sequence-parallel" in text.lower()


def reference_forward(ref, batch):
    """The stock model's logits and loss, backward done. A packed row is run one document at a
    time: what packing means (and what transformers' flash backends compute), where a stock sdpa or
    eager mask of some models would let the documents see each other."""
    from types import SimpleNamespace

    if "position_ids" not in batch:
        out = ref(**batch)
        out.loss.backward()
        return out
    pos = batch["position_ids"][0]
    starts = (pos == 0).nonzero().flatten().tolist() + [pos.numel()]
    ids = batch["input_ids"]
    logits = torch.cat([ref(input_ids=ids[:, a:b], use_cache=False).logits for a, b in zip(starts, starts[1:])], 1)
    labels = batch["labels"]
    loss = torch.nn.functional.cross_entropy(logits[0, :-1].float(), labels[0, 1:], ignore_index=-100)
    loss.backward()
    return SimpleNamespace(logits=logits, loss=loss)


def reference_results(ref, kind: str) -> dict:
    """The stock model's logits, loss and gradients on one batch."""
    ref.zero_grad(set_to_none=True)
    batch = {**make_batch(kind), "use_cache": False}
    out = reference_forward(ref, batch)
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in ref.named_parameters()}
    return {"logits": out.logits.detach(), "loss": out.loss.item(), "grads": grads}


def sp_results(model, reference: dict, kind: str, world: int) -> dict:
    """The SP model on the same batch, compared with ``reference`` (call on every rank)."""
    import torch.distributed as dist

    import ulysses_attn
    from ulysses_attn import shard_batch
    from ulysses_attn.comm import all_gather_seq
    from ulysses_attn.loss import causal_lm_loss
    from ulysses_attn.models import decoder_layers

    sp = ulysses_attn.get_sequence_parallel()
    model.zero_grad(set_to_none=True)
    model.loss_function = causal_lm_loss
    seen: list = []
    handles = []
    for layer in decoder_layers(model):
        def hook(m, args, kwargs, out):
            h = kwargs.get("hidden_states", args[0] if args else None)
            seen.append(h.shape[1] if isinstance(h, torch.Tensor) else None)
        handles.append(layer.register_forward_hook(hook, with_kwargs=True))
    batch = {**make_batch(kind), "use_cache": False}
    shard = shard_batch(batch)
    try:
        out = model(**shard)
    finally:
        for h in handles:
            h.remove()
    out.loss.backward()
    seq = batch["input_ids"].shape[1]
    logits = all_gather_seq(out.logits.detach().contiguous(), sp.group)[:, :seq]
    keep = batch.get("attention_mask", torch.ones_like(batch["input_ids"])).bool()
    ref_grads = reference["grads"]
    # a gradient that is zero in exact arithmetic (a key bias under softmax) is compared against the
    # scale of the model's gradients, not its own rounding noise
    floor = GRAD_FLOOR * max((g.norm().item() for g in ref_grads.values() if g is not None), default=1.0)
    grads = {}
    for n, p in model.named_parameters():
        g = torch.zeros_like(p) if p.grad is None else p.grad.clone()
        dist.all_reduce(g)
        ref_grad = torch.zeros_like(p) if ref_grads.get(n) is None else ref_grads[n]
        grads[n] = ((g / world - ref_grad).norm() / max(ref_grad.norm().item(), floor)).item()
    worst = max(grads, key=grads.get) if grads else None
    ref_loss = reference["loss"]
    return {
        "local_seq": sorted(set(seen), key=str),
        "shard_seq": shard["input_ids"].shape[1],
        "loss": abs(out.loss.item() - ref_loss) / max(abs(ref_loss), 1e-12),
        "logits": rel_err(logits[keep], reference["logits"][keep]),
        "grad": grads[worst] if worst else 0.0,
        "worst_grad": worst,
    }


def check_case(cfg, kind: str, world: int) -> dict:
    """One batch kind of one config: the stock model in this process against the SP model."""
    ref, _ = build_reference(cfg)
    reference = reference_results(ref, kind)
    return sp_results(build(cfg, "ulysses_flash"), reference, kind, world)


def verdict(r: dict) -> str:
    if "error" in r:
        return r["error"]
    if r["local_seq"] != [r["shard_seq"]]:
        return f"wrong: decoder layers saw {r['local_seq']} tokens, not {r['shard_seq']}"
    bad = [f"{k} {r[k]:.1e}" for k in ("loss", "logits", "grad") if not r[k] < RTOL]
    if bad:
        return "wrong: " + ", ".join(bad) + (f" ({r['worst_grad']})" if "grad" in " ".join(bad) else "")
    return "exact"


def check_model(model_type: str, world: int, kinds=KINDS) -> dict:
    """Verdicts of one architecture at SP = world, per batch kind (call on every rank)."""
    import torch.distributed as dist

    try:
        cfg = tiny_config(model_type)
        ref, _ = build_reference(cfg)
        # the stock model must run every batch: else the tiny config is at fault
        references = {kind: reference_results(ref, kind) for kind in kinds}
    except Exception as e:
        return {"build": f"not buildable: {_first_line(e)}"}
    try:
        model = build(cfg, "ulysses_flash")
    except Exception as e:  # refused when the model is built
        return {"build": ("refused: " if _ours(e) else "error: ") + _first_line(e)}
    results = {}
    for kind in kinds:
        try:
            r = sp_results(model, references[kind], kind, world)
        except Exception as e:
            r = {"error": ("refused: " if _ours(e) else "error: ") + _first_line(e)}
        results[kind] = verdict(r)
        dist.barrier()
    return results


def _zoo_worker(rank, world, model_types, progress):
    import ulysses_attn

    ulysses_attn.init_sequence_parallel(world)
    out = {}
    for mt in model_types:
        out[mt] = check_model(mt, world)
        if rank == 0 and progress:
            print(f"{mt:28s} {out[mt]}", flush=True)
    return out


def causal_lm_types() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


REASONS = (  # (what the message says, the table's words)
    ("mixes tokens outside the attention function", "token mixing outside attention"),
    ("ran without calling the attention function", "token mixing outside attention"),
    ("no transformers decoder layers", "no decoder layers to check"),
    ("does not route its attention through", "attention outside AttentionInterface"),
    ("flash-attention path", "masks a flash backend does not get"),
    ("attention sinks", "attention sinks"),
    ("attends bidirectionally", "bidirectional attention"),
    ("numbers positions from its padding index", "positions from the padding index"),
    ("takes no position_ids", "no position_ids"),
    ("2D padding mask", "4D attention mask"),
    ("prefix_lm", "prefix-LM mask (transformers)"),
    ("packed rows (position_ids restarting, or cu_seq_lens) in a model with", "packed rows in linear-attention layers"),
)


def short(verdict_text: str) -> str:
    """One table cell: ``exact``, ``refused: <reason>``, ``not buildable: <error>``, ``wrong``, ``error``."""
    kind, _, detail = verdict_text.partition(": ")
    if kind == "refused":
        reason = next((label for text, label in REASONS if text in detail), detail[:80])
        return f"refused: {reason}"
    if kind == "not buildable":
        return "not buildable: " + detail[:90].replace("|", "/").replace("`", "")
    return verdict_text[:120].replace("|", "/")


def table(results: dict) -> str:
    """The markdown table of docs/models-and-limits.md for ``{model_type: {kind: verdict}}``."""
    rows = ["| architecture | plain | padded | packed |", "|---|---|---|---|"]
    for mt in sorted(results):
        r = results[mt]
        if "build" in r:
            rows.append(f"| `{mt}` | {short(r['build'])} | | |")
            continue
        cells = [short(r[k]) for k in KINDS]
        if len(set(cells)) == 1 and cells[0] != "exact":
            rows.append(f"| `{mt}` | {cells[0]} | | |")
        else:
            rows.append(f"| `{mt}` | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def counts(results: dict) -> dict:
    out = {"exact": 0, "refused": 0, "not buildable": 0, "wrong": 0, "error": 0}
    for r in results.values():
        verdicts = [r["build"]] if "build" in r else list(r.values())
        order = ("wrong", "error", "not buildable", "refused")
        worst = next((k for k in order if any(v.startswith(k) for v in verdicts)), "exact")
        out[worst] += 1
    return out


BEGIN, END = "<!-- zoo table: python tests/zoo.py --write -->", "<!-- end of zoo table -->"
DOC = "docs/models-and-limits.md"


def run_zoo(world: int = 2, types=None) -> dict:
    from distributed import run_distributed

    return run_distributed(_zoo_worker, world, list(types or causal_lm_types()), False)[0]


def documented_table(root: str) -> str:
    import os

    with open(os.path.join(root, DOC)) as f:
        doc = f.read()
    return doc[doc.index(BEGIN) + len(BEGIN) : doc.index(END)].strip()


if __name__ == "__main__":
    import os
    import sys

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from distributed import run_distributed

    args = [a for a in sys.argv[1:] if a != "--write"]
    world = int(args[0]) if args else 2
    types = args[1:] or causal_lm_types()
    results = run_distributed(_zoo_worker, world, types, True)[0]
    print(counts(results))
    if "--write" in sys.argv:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        with open(os.path.join(root, DOC)) as f:
            doc = f.read()
        start, end = doc.index(BEGIN) + len(BEGIN), doc.index(END)
        with open(os.path.join(root, DOC), "w") as f:
            f.write(doc[:start] + "\n" + table(results) + "\n" + doc[end:])
