"""report.md and its figures: what was read, what was kept, and why the rest went."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _n(x: float) -> str:
    return f"{x:,.0f}"


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines + [""]


def _plots(out: Path, stats: dict) -> list[str]:
    import matplotlib  # matplotlib loads only when a figure is drawn
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs = []
    doms = list(stats["domains"])
    x = np.arange(len(doms))
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, key in zip(axes, ("docs", "words", "tokens")):
        before = [stats["domains"][d]["before"].get(key, 0) for d in doms]
        after = [stats["domains"][d]["train"][key] + stats["domains"][d]["validation"][key] for d in doms]
        mixed = [stats["domains"][d]["train_mixed"][key] for d in doms]
        ax.bar(x - 0.27, before, 0.27, label="read")
        ax.bar(x, after, 0.27, label="kept")
        ax.bar(x + 0.27, mixed, 0.27, label="train stream (mixed)")
        ax.set_xticks(x, doms, rotation=30, ha="right")
        ax.set_title(key)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "sizes.png", dpi=100)
    plt.close(fig)
    figs.append("sizes.png")

    reasons = sorted({r for c in stats["removed"].values() for r in c})
    if reasons:
        fig, ax = plt.subplots(figsize=(8, 0.35 * len(reasons) + 1.5))
        left = np.zeros(len(reasons))
        for d in doms:
            vals = np.array([stats["removed"].get(d, {}).get(r, 0) for r in reasons])
            ax.barh(reasons, vals, left=left, label=d)
            left += vals
        ax.set_xlabel("documents removed")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "removals.png", dpi=100)
        plt.close(fig)
        figs.append("removals.png")

    edges = np.asarray(stats["hist_edges"])
    cols = min(3, len(doms))
    rows = (len(doms) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.3 * cols, 3 * rows), squeeze=False)
    for ax, d in zip(axes.flat, doms):
        ax.stairs(stats["domains"][d]["hist_before"], edges, label="read")
        ax.stairs(stats["domains"][d]["hist_after"], edges, label="kept")
        ax.set_xscale("log")
        ax.set_title(d)
        ax.set_xlabel("words per document")
    for ax in list(axes.flat)[len(doms):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "lengths.png", dpi=100)
    plt.close(fig)
    figs.append("lengths.png")

    sizes = stats["duplicates"]["size_counts"]
    if sizes:
        fig, ax = plt.subplots(figsize=(6, 3.2))
        ks = sorted(int(k) for k in sizes)
        ax.bar([str(k) for k in ks], [sizes[k] if k in sizes else sizes[str(k)] for k in ks])
        ax.set_xlabel("documents per duplicate cluster")
        ax.set_ylabel("clusters")
        fig.tight_layout()
        fig.savefig(out / "duplicates.png", dpi=100)
        plt.close(fig)
        figs.append("duplicates.png")
    return figs


def _workers(stats: dict) -> str:
    if stats.get("engine") == "ray":
        return f"the ray engine on {stats['ray_cpus']} CPU(s)"
    return f"{stats['num_proc']} process(es)"


def write_report(out: Path, stats: dict, examples: list[dict], plots: bool = True) -> Path:
    figs = _plots(out, stats) if plots else []
    doms = stats["domains"]
    lines = [f"# Data preparation: {stats['name']}", ""]
    lines.append(f"{stats['input_bytes'] / 2**20:,.1f} MB read in {stats['seconds']:.1f} s "
                 f"({stats['mb_per_s']:.2f} MB/s, {_workers(stats)}; "
                 f"{stats['resumed_units']} work unit(s) resumed from an earlier run).")
    lines.append(f"Tokens are counted with {stats['tokens_counted_with']}.")
    lines.append("")
    lines += _table(["stage", "seconds"], [[k, f"{v:.2f}"] for k, v in stats["stage_seconds"].items()])

    lines += ["## Documents, words and tokens per domain", ""]
    rows = []
    for d, s in doms.items():
        b = s["before"]
        for key in ("docs", "words", "tokens"):
            rows.append([d, key, _n(b.get(key, 0)), _n(s["train"][key]), _n(s["validation"][key]),
                         _n(s["train_mixed"][key])])
    lines += _table(["domain", "unit", "read", "train", "validation", "train stream (mixed)"], rows)
    if "sizes.png" in figs:
        lines += ["![sizes](sizes.png)", ""]

    lines += ["## Removed documents", "",
              f"{stats.get('removed_documents', 0):,} documents removed; removed.jsonl lists each with its id, "
              "source, reason, the document it duplicated and their similarity.", ""]
    reasons = sorted({r for c in stats["removed"].values() for r in c})
    if reasons:
        rows = [[r] + [_n(stats["removed"].get(d, {}).get(r, 0)) for d in doms] for r in reasons]
        lines += _table(["reason"] + list(doms), rows)
    else:
        lines += ["None.", ""]
    if "removals.png" in figs:
        lines += ["![removals](removals.png)", ""]
    shown = [(d, r, t) for d, ex in stats.get("removed_examples", {}).items() for r, t in sorted(ex.items()) if t]
    if shown:
        lines += ["One removed document per reason and domain (its start):", ""]
        lines += _table(["domain", "reason", "text"],
                        [[d, r, " ".join(t.split())[:160].replace("|", "\\|")] for d, r, t in shown])
    if stats["input_events"]:
        lines += ["Input problems met (files skipped, records cut or re-decoded, boilerplate lines dropped):", ""]
        lines += _table(["event", "count"], [[k, _n(v)] for k, v in sorted(stats["input_events"].items())])

    lines += ["## Document lengths", ""]
    if "lengths.png" in figs:
        lines += ["![lengths](lengths.png)", ""]
    rows = []
    for d, s in doms.items():
        b = s["before"]
        rows.append([d, f"{b.get('words', 0) / max(b.get('docs', 0), 1):.1f}",
                     f"{s['train']['words'] / max(s['train']['docs'], 1):.1f}"])
    lines += _table(["domain", "mean words read", "mean words kept (train)"], rows)

    dup = stats["duplicates"]
    lines += ["## Duplicates", "",
              f"{dup['clusters']:,} clusters hold {dup['documents_in_clusters']:,} documents "
              f"(largest: {dup['largest']:,}); {dup.get('near_pairs', 0):,} near-duplicate pairs, "
              + ("each checked with the true Jaccard similarity" if dup.get("verified") else
                 "accepted on the MinHash estimate (dedup.verify: false)")
              + "; a document is removed when it pairs with one kept (the longest first).", ""]
    if "duplicates.png" in figs:
        lines += ["![duplicates](duplicates.png)", ""]
    for i, ex in enumerate(examples, 1):
        lines += [f"**Cluster {i}** ({ex['size']} documents)", ""]
        for m in ex["members"]:
            snippet = " ".join(m["text"].split())[:200].replace("|", "\\|")
            tag = "kept" if m["kept"] else f"{m['reason']}, similarity {m['similarity']:.2f}"
            lines.append(f"- ({tag}) {snippet}")
        lines.append("")

    lines += ["## Mixing weights (training stream)", "",
              f"Sizes count {stats['mix_by']}; the ratio is how many times each training document is "
              "used on average (below 1: down-sampled).", ""]
    lines += _table(["domain", "size", "natural share", "weight", "ratio"],
                    [[d, _n(m["size"]), f"{m['natural']:.3f}", f"{m['weight']:.3f}", f"{m['ratio']:.2f}"]
                     for d, m in stats["mix"].items()])
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
