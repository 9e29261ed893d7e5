"""The files an evaluation leaves behind for a researcher: tables, plots, per-query ranks, a failure gallery,
and a side-by-side comparison of several models on the same data.

Kept apart from `evaluate`, which computes the numbers: this module only reads an `EvalReport`.
"""

from __future__ import annotations

import csv
import html
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from retrieval.errors import ConfigError

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from retrieval.training.types import EvalReport

#: The recall@K plot runs from K=1 to this.
CURVE_K = 50

_TABLE_ROWS = [
    ("R@1", "recall@1", True),
    ("R@5", "recall@5", True),
    ("R@10", "recall@10", True),
    ("MRR", "mrr", True),
    ("nDCG@10", "ndcg@10", True),
    ("P@1", "precision@1", True),
    ("P@5", "precision@5", True),
    ("P@10", "precision@10", True),
    ("median rank", "median_rank", False),
    ("mean rank", "mean_rank", False),
    ("queries", "n_queries", False),
]
_DIRECTIONS = ("text_to_image", "image_to_text")
_ARROWS = {"text_to_image": "text→image", "image_to_text": "image→text"}


def _cell(value: object, percent: bool) -> str:
    if isinstance(value, bool) or not isinstance(value, float | int):
        return "–"
    if percent:
        return f"{100 * value:.1f}"
    return str(value) if isinstance(value, int) else f"{value:.1f}"


def _rows(report: EvalReport) -> list[tuple[str, str, bool]]:
    """The paper rows, then recall/precision/nDCG at every other cutoff the user asked for."""
    have = {key for _, key, _ in _TABLE_ROWS}
    extra = [
        (f"{name}@{k}", f"{key}@{k}", True)
        for k in report_ks(report)
        for name, key in (("R", "recall"), ("P", "precision"), ("nDCG", "ndcg"))
        if f"{key}@{k}" not in have
    ]
    return _TABLE_ROWS[:-3] + extra + _TABLE_ROWS[-3:]


def report_ks(report: EvalReport) -> list[int]:
    """The cutoffs this report was computed at."""
    keys = report.metrics.text_to_image.at_k
    return sorted({int(k.split("@")[1]) for k in keys if k.startswith("recall@")}) or [1, 5, 10]


def markdown_table(report: EvalReport) -> str:
    """The table papers print (fractions shown as percentages), with chance level and what was evaluated."""
    t2i, i2t = report.metrics.text_to_image.to_dict(), report.metrics.image_to_text.to_dict()
    lines = ["| metric | text→image | image→text |", "|---|---:|---:|"]
    lines += [
        f"| {label} | {_cell(t2i.get(k), p)} | {_cell(i2t.get(k), p)} |" for label, k, p in _rows(report)
    ]
    chance_t, chance_i = report.metrics.text_to_image.chance, report.metrics.image_to_text.chance
    for k in report_ks(report):
        key = f"recall@{k}"
        lines.append(
            f"| R@{k} at chance | {_cell(chance_t.get(key), True)} | {_cell(chance_i.get(key), True)} |"
        )
    c = report.counts
    lines += [
        "",
        f"rsum {report.metrics.rsum:.1f} · mean recall {report.metrics.mean_recall:.2f} · "
        f"model `{report.model['name']}` · index {report.index.factory}"
        + (" (exact)" if report.index.exact else " (approximate)"),
        f"dataset {report.dataset_format}, split {report.split or 'all'}: {c['images']} images, "
        f"{c['captions']} captions; {c['images_missing']} listed images missing, "
        f"{c['images_unreadable']} unreadable.",
    ]
    for direction, ci in report.intervals.items():
        spans = ", ".join(f"R@{k.split('@')[1]} {100 * lo:.1f}–{100 * hi:.1f}" for k, (lo, hi) in ci.items())
        lines.append(f"95% bootstrap intervals, {_ARROWS[direction]}: {spans}")
    if report.index.note:
        lines.append(f"note: {report.index.note}")
    return "\n".join(lines) + "\n"


def _figure() -> tuple[Figure, Axes]:
    # The object-oriented API with an Agg canvas leaves pyplot's global backend alone.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure as _Figure

    fig = _Figure(figsize=(6.4, 4.4), dpi=100)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _chance_curve(ranks_n_items: int, relevant: float, ks: np.ndarray) -> np.ndarray:
    """Recall@K of a random ranking with `relevant` (mean) relevant items among `ranks_n_items`."""
    miss = np.ones(len(ks))
    for i, k in enumerate(ks):
        for j in range(min(int(k), ranks_n_items)):
            miss[i] *= max(0.0, (ranks_n_items - relevant - j) / (ranks_n_items - j))
    return 100 * (1 - miss)


def _recall_axes(ax: Axes, title: str) -> None:
    ax.set(xlabel="K", ylabel="recall@K (%)", ylim=(0, 100), xlim=(1, CURVE_K))
    ax.set_title(title[:70], fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")


def _save_plots(report: EvalReport, out_dir: Path) -> dict[str, Path]:
    directions = {
        "text→image": report.metrics.text_to_image.ranks,
        "image→text": report.metrics.image_to_text.ranks,
    }
    ks = np.arange(1, CURVE_K + 1)
    fig, ax = _figure()
    n_images, n_captions = len(report.image_ids), len(report.captions)
    chance = {
        "text→image": _chance_curve(n_images, 1.0, ks),
        "image→text": _chance_curve(n_captions, n_captions / max(1, n_images), ks),
    }
    for (name, ranks), colour in zip(directions.items(), ("C0", "C1"), strict=True):
        ax.plot(ks, [100 * float(np.mean(ranks <= k)) for k in ks], label=name, color=colour)
        ax.plot(ks, chance[name], linestyle=":", color=colour, label=f"{name} at chance")
    _recall_axes(ax, f"Recall@K · {Path(str(report.model['name'])).name}")
    fig.tight_layout()
    paths = {"recall_curve": out_dir / "recall_at_k.png"}
    fig.savefig(paths["recall_curve"])

    fig, ax = _figure()
    top = max(int(r.max()) for r in directions.values())
    edges = [float(e) for e in np.unique(np.geomspace(1, top + 1, num=min(40, top + 1)).astype(int))]
    if len(edges) < 2:
        edges = [1.0, 2.0]
    for name, ranks in directions.items():
        # Shares, not counts: text→image has several queries per image-to-text query.
        ax.hist(ranks, bins=edges, weights=np.full(len(ranks), 100.0 / len(ranks)), alpha=0.55, label=name)
    ax.set(xlabel="rank of the first relevant item", ylabel="% of queries")
    if len(edges) > 2:
        ax.set_xscale("log")
    ax.set_title("Rank histogram (1 is best)", fontsize=9)
    # Above the plot area, outside it: rank-1 bars are often the tallest and a legend inside covers them.
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.06), ncol=2, fontsize=8, frameon=False)
    fig.tight_layout()
    paths["rank_histogram"] = out_dir / "rank_histogram.png"
    fig.savefig(paths["rank_histogram"])
    return paths


def _relative(path: str, out_dir: Path) -> str:
    """A link from the gallery page to an image: relative when possible, so the folder can be moved."""
    try:
        return Path(os.path.relpath(path, out_dir)).as_posix()
    except ValueError:  # another drive on Windows
        return Path(path).as_uri()


def write_gallery(report: EvalReport, out_dir: Path) -> Path:
    """An HTML page of the worst text→image queries: the right image, and what ranked above it, with paths.

    Every string from the dataset (captions, ids, paths) is HTML-escaped: annotation files are data from
    outside, and a caption holding markup must show as text, not run in the reader's browser.
    """
    e = html.escape
    parts = [
        "<!doctype html><html lang=en><meta charset=utf-8>",
        f"<title>Failure gallery · {e(str(report.model['name']))}</title>",
        "<style>body{font:14px system-ui,sans-serif;margin:1.5rem;color:#1a1a1a;background:#fff}"
        "figure{display:inline-block;width:180px;margin:.3rem;vertical-align:top}"
        "img{width:180px;height:135px;object-fit:contain;background:#eee}"
        "figcaption{font-size:12px;word-break:break-all}.right{outline:3px solid #1b5e20}"
        "section{border-top:1px solid #ccc;padding:.5rem 0}</style>",
        f"<h1>Worst text→image queries · {e(str(report.model['name']))}</h1>",
        f"<p>{len(report.worst)} queries ranked their image worst (out of {len(report.captions)}). "
        "Each row: the five images ranked first, then the right one, outlined, with its rank.</p>",
    ]
    for w in report.worst:
        right_path = report.image_paths[w.image] if report.image_paths else ""
        parts.append(f"<section><h2>“{e(w.caption)}” · right image at rank {w.rank}</h2>")
        for pos, (i, score) in enumerate(w.top, 1):
            path = report.image_paths[i] if report.image_paths else ""
            parts.append(
                f"<figure><img src='{e(_relative(path, out_dir))}' alt='rank {pos}' loading=lazy>"
                f"<figcaption>rank {pos} · score {score:.3f}<br>{e(report.image_ids[i])}<br>"
                f"{e(path)}</figcaption></figure>"
            )
        parts.append(
            f"<figure><img class=right src='{e(_relative(right_path, out_dir))}' alt='the right image'>"
            f"<figcaption>right image · rank {w.rank}<br>{e(report.image_ids[w.image])}<br>"
            f"{e(right_path)}</figcaption></figure></section>"
        )
    page = out_dir / "failures.html"
    page.write_text("\n".join(parts) + "\n", encoding="utf-8")
    return page


def _mkdir(out_dir: Path) -> Path:
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create the output folder {out_dir}: {exc.strerror or exc}") from exc
    return out_dir


def write_report(report: EvalReport, out_dir: Path) -> dict[str, Path]:
    """Write report.json, report.md, per-query rank CSVs (with paths), PNG plots and failures.html."""
    out_dir = _mkdir(out_dir)
    paths = {
        "ranks_text_to_image": out_dir / "ranks_text_to_image.csv",
        "ranks_image_to_text": out_dir / "ranks_image_to_text.csv",
    }
    image_paths = report.image_paths or [""] * len(report.image_ids)
    with paths["ranks_text_to_image"].open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["caption", "image", "path", "rank"])
        ranks = report.metrics.text_to_image.ranks
        for caption, image, rank in zip(report.captions, report.caption_to_image, ranks, strict=True):
            writer.writerow([caption, report.image_ids[int(image)], image_paths[int(image)], int(rank)])
    with paths["ranks_image_to_text"].open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "path", "captions", "rank"])
        per_image = np.bincount(report.caption_to_image, minlength=len(report.image_ids))
        ranks = report.metrics.image_to_text.ranks
        for image, path, n, rank in zip(report.image_ids, image_paths, per_image, ranks, strict=True):
            writer.writerow([image, path, int(n), int(rank)])
    paths.update(_save_plots(report, out_dir))
    paths["gallery"] = write_gallery(report, out_dir)
    paths["markdown"] = out_dir / "report.md"
    paths["markdown"].write_text(markdown_table(report), encoding="utf-8")
    paths["json"] = out_dir / "report.json"
    report.files = {name: str(path) for name, path in paths.items()}
    paths["json"].write_text(json.dumps(report.to_dict(), indent=2, ensure_ascii=False), encoding="utf-8")
    return paths


# --------------------------------------------------------------------------- several models


def comparison_table(reports: Sequence[EvalReport]) -> str:
    """One Markdown table, a column per model and direction, on the same data (checked by the caller)."""
    if not reports:
        raise ConfigError("nothing to compare: give at least one evaluation")
    names = [str(r.model["name"]) for r in reports]
    head = " | ".join(f"{Path(n).name} {_ARROWS[d]}" for n in names for d in _DIRECTIONS)
    lines = [f"| metric | {head} |", "|---|" + "---:|" * (2 * len(reports))]
    dicts = [(r.metrics.text_to_image.to_dict(), r.metrics.image_to_text.to_dict()) for r in reports]
    for label, key, pct in _rows(reports[0]):
        cells = " | ".join(_cell(d.get(key), pct) for pair in dicts for d in pair)
        lines.append(f"| {label} | {cells} |")
    rsums = [cell for r in reports for cell in (f"{r.metrics.rsum:.1f}", "")]  # one per model, two columns
    lines.append(f"| rsum | {' | '.join(rsums)} |")
    return "\n".join(lines) + "\n"


def write_comparison(reports: Sequence[EvalReport], out_dir: Path) -> dict[str, Path]:
    """comparison.md, comparison.json and comparison_recall.png for several models on one dataset."""
    out_dir = _mkdir(out_dir)
    sizes = {(len(r.image_ids), len(r.captions)) for r in reports}
    if len(sizes) > 1:
        raise ConfigError(f"the evaluations were run on different data ({sorted(sizes)} images, captions)")
    paths = {"markdown": out_dir / "comparison.md", "json": out_dir / "comparison.json"}
    paths["markdown"].write_text(comparison_table(reports), encoding="utf-8")
    payload = {"models": [r.to_dict() for r in reports]}
    paths["json"].write_text(json.dumps(payload, indent=2, ensure_ascii=False), encoding="utf-8")
    ks = np.arange(1, CURVE_K + 1)
    fig, ax = _figure()
    for i, r in enumerate(reports):
        ranks = r.metrics.text_to_image.ranks
        ax.plot(
            ks,
            [100 * float(np.mean(ranks <= k)) for k in ks],
            color=f"C{i}",
            label=Path(str(r.model["name"])).name,
        )
    ax.plot(ks, _chance_curve(len(reports[0].image_ids), 1.0, ks), ":", color="grey", label="chance")
    _recall_axes(ax, "text→image recall@K, side by side")
    fig.tight_layout()
    paths["plot"] = out_dir / "comparison_recall.png"
    fig.savefig(paths["plot"])
    return paths
