"""Plots for docs/benchmarks.md and docs/long-sequences.md from the JSON in benchmarks/results/.

    python benchmarks/plot.py            # writes docs/img/*.png (needs matplotlib)

Each training figure names the GPU from the JSON's ``info.gpu`` and plots tokens/s per GPU and
peak memory per GPU against the sequence length, one line per mode; configurations that ran out of
memory are drawn as crosses at the GPU's memory (``--gpu-memory-gib`` where it was capped), other
failures are left out. ``packed_kernels.png`` plots bench_packed.py's attention TFLOP/s against the
number of packed documents, one line per kernel.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"

OURS = "ulysses_attn long_sequence"
OURS_SELECTIVE = OURS + " + selective"
OURS_SELECTIVE_OFFLOAD = OURS + " + selective, kept outputs offloaded"
ALST = "ALST TiledMLP + TiledFusedLogitsLoss + offload"
LONG_SEQUENCE_MODES = {"ulysses": OURS, "ulysses+selective": OURS_SELECTIVE, "alst": ALST,
                       "ulysses@flash_attn": OURS + ", FlashAttention-4 (separate runs)"}


def long_sequence_modes(suffix: str = "", alst_suffix: str = "") -> dict[str, str]:
    """Labels of the long-sequence comparisons: ours plain, + selective (offloaded), ALST."""
    return {"ulysses": OURS + suffix, "ulysses+selective": OURS_SELECTIVE + suffix,
            "ulysses+selective+offload": OURS_SELECTIVE_OFFLOAD + suffix, "alst": ALST + (alst_suffix or suffix)}


FIGURES = {
    "sp2_1b": dict(
        title="Llama-3.2-1B shape, P = 2 (SP) vs no SP",
        files=["2026-11-28_h200x2_1b_p2_16k-32k.json", "2026-11-28_h200x2_1b_p2_64k.json",
               "2026-11-28_h200x2_1b_p2_128k.json", "2026-11-28_h200x2_1b_p2_128k_enable_gqa.json"],
        modes={"sdpa": "no SP (sdpa, DP 2)", "ulysses": "ulysses_flash", "alst": "DeepSpeed ALST"},
    ),
    "long_sequence_1b": dict(
        title="Llama-3.2-1B shape, one GPU, long-sequence memory features",
        files=["2026-11-29_h200_1b_p1_long_sequence_split_64k-128k.json",
               "2026-11-29_h200_1b_p1_long_sequence_split_256k.json",
               "2026-11-29_h200_1b_p1_fa4_long_sequence_128k.json",
               "2026-11-29_h200_1b_p1_fa4_long_sequence_256k.json"],
        modes=LONG_SEQUENCE_MODES,
    ),
    "long_sequence_1b_fa4": dict(
        title="Llama-3.2-1B shape, one GPU, FlashAttention-4 on both sides",
        files=["2026-11-29_h200_1b_p1_fa4_selective_vs_alst_fa4_64k.json",
               "2026-11-29_h200_1b_p1_fa4_selective_vs_alst_fa4_128k.json"],
        modes=long_sequence_modes(alst_suffix=" (attention: flash_attention_4)"),
    ),
    "zero3_8b_sp2": dict(
        title="Llama-3.1-8B shape, SP 2, ZeRO-3, long-sequence memory features",
        files=["2026-11-29_h200x2_8b_p2_zero3_long_sequence_64k.json",
               "2026-11-29_h200x2_8b_p2_zero3_long_sequence_128k.json"],
        modes=long_sequence_modes(),
    ),
    "as_80gb_8b": dict(
        title="Llama-3.1-8B shape, P = 1, one GPU capped at 79.6 GiB (an 80 GB H100's memory)",
        files=["2026-11-29_h200_8b_p1_fa4_as_80gb_ours.json",
               "2026-11-29_h200_8b_p1_fa4_as_80gb_ours_selective_offload.json",
               "2026-11-29_h200_8b_p1_fa4_as_80gb_alst_fa4.json"],
        modes=long_sequence_modes(" (FA4)"),
    ),
    "long_sequence_8b": dict(
        title="Llama-3.1-8B shape, one GPU, long-sequence memory features",
        files=["2026-11-29_h200_8b_p1_long_sequence_32k-64k.json", "2026-11-29_h200_8b_p1_fa4_long_sequence_64k.json"],
        modes=LONG_SEQUENCE_MODES,
    ),
}


def load(files: list[str]) -> tuple[str, dict[str, list[tuple[int, float, float]]], dict[str, list[tuple[int, float]]]]:
    gpus, lines, oom = set(), defaultdict(dict), defaultdict(dict)
    for name in files:
        data = json.loads((RESULTS / name).read_text())
        info = data["info"]
        gpus.add(f"{info['gpu']} x{info.get('gpu_count', '?')}")
        for r in data["results"]:
            if "error" not in r:  # a later file's run of the same point replaces an earlier one
                lines[r["mode"]][r["seq"]] = (r["tokens_per_s_per_gpu"], r["peak_mem_gib"])
            elif r["error"].startswith("OOM"):
                oom[r["mode"]][r["seq"]] = info.get("gpu_memory_cap_gib") or info.get("gpu_mem_gib")
    series = {m: sorted((s, *v) for s, v in pts.items()) for m, pts in lines.items()}
    return ", ".join(sorted(gpus)), series, {m: sorted(pts.items()) for m, pts in oom.items()}


def plot(key: str, spec: dict, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gpu, series, oom = load(spec["files"])
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.6))
    ticks = set()
    for mode, label in spec["modes"].items():
        if mode not in series and mode not in oom:
            continue
        color = None
        if mode in series:
            seq, tok, mem = zip(*series[mode])
            kk = [s // 1024 for s in seq]
            ticks.update(kk)
            ax_t.plot(kk, tok, marker="o", label=label)
            color = ax_m.plot(kk, mem, marker="o", label=label)[0].get_color()
        if mode in oom:
            kk, mem = zip(*((s // 1024, m) for s, m in oom[mode]))
            ticks.update(kk)
            ax_m.plot(kk, mem, "x", color=color, markersize=9, mew=2,
                      label=None if mode in series else label)
    if oom:
        ax_m.plot([], [], "x", color="gray", label="out of memory")
    for ax, ylabel in ((ax_t, "tokens/s per GPU"), (ax_m, "peak memory per GPU (GiB)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(ticks), [str(k) for k in sorted(ticks)])
        ax.minorticks_off()
        ax.set_xlabel("sequence length (K tokens)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    fig.legend(*ax_m.get_legend_handles_labels(), loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.suptitle(f"{spec['title']} -- {gpu}", fontsize=10)
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    path = out / f"{key}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# bench_packed.py: attention TFLOP/s against the number of packed documents, one line per kernel
PACKED = dict(
    title="Inner attention on 65536 packed tokens, 16 / 4 heads, head_dim 128, forward + backward",
    lines=[  # (file, kernel, timing, label)
        ("2026-11-29_h200_packed_kernels/packed_64k.json", "flash_attn", "fresh", "FlashAttention-4 (varlen)"),
        ("2026-11-29_h200_fa2/packed_fa2.json", "flash_attn", "fresh", "FlashAttention 2 (varlen)"),
        ("2026-11-29_h200_packed_kernels/packed_64k.json", "torch_varlen", "fresh", "torch_varlen (FA2 in PyTorch)"),
        ("2026-11-29_h200_packed_kernels/packed_64k.json", "sdpa", "same", "sdpa per document, lengths repeat"),
        ("2026-11-29_h200_packed_kernels/packed_64k.json", "sdpa", "fresh", "sdpa per document, new lengths"),
    ],
)


def plot_packed(out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    gpus = set()
    for name, kernel, timing, label in PACKED["lines"]:
        data = json.loads((RESULTS / name).read_text())
        gpus.add(data["env"]["device"])
        rows = [r for r in data["results"] if r["kernel"] == kernel and r["head_dim"] == 128 and "error" not in r]
        ax.plot([r["documents"] for r in rows], [r[f"tflops_{timing}"] for r in rows], marker="o",
                linestyle="--" if timing == "same" and kernel == "sdpa" else "-", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("documents in the sequence (random lengths)")
    ax.set_ylabel("TFLOP/s (7 * sum(L_i^2) * H * D / time)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{PACKED['title']} -- {', '.join(sorted(gpus))}", fontsize=9)
    fig.tight_layout()
    path = out / "packed_kernels.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT.parent / "docs" / "img"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for key, spec in FIGURES.items():
        print(plot(key, spec, out))
    print(plot_packed(out))


if __name__ == "__main__":
    main()
