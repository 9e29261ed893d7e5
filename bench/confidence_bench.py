"""Confidence: does it tell a caption query from nonsense on scene models it was not tuned on?

Confidence is only worth showing if a true query's hit is called confident and a query about nothing
in the collection is not, on *any* model, not just the one the method was tuned on. This bench trains
small scene CLIPs with different seeds, scene counts and step counts (`retrieval.demo.recipes`),
indexes each model's 200 held-out test scenes through the product's ingest, and then:

- `signals`: scores every candidate confidence signal on the stored embeddings (ROC AUC of true caption
  queries against nonsense ones, and how many of each a fixed threshold calls confident);
- `report` (default): runs the product's own `Searcher` on each collection and prints the figures of
  docs/EVAL.md: true caption queries confident, nonsense queries flagged "no confident match", AUC.

The nonsense queries are generated here from word lists that share nothing with the null sentences
of `retrieval.confidence` (so the null bank is not graded on its own sentences); a fifth of them carry a
colour word, as users' queries do ("a purple elephant playing the piano"). Run it under the CPU lock:

    flock /work/cpu.lock .venv/bin/python bench/confidence_bench.py prepare --work /tmp/conf-bench
    .venv/bin/python bench/confidence_bench.py signals --work /tmp/conf-bench
    flock /work/cpu.lock .venv/bin/python bench/confidence_bench.py report --work /tmp/conf-bench
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import numpy.typing as npt

F32 = npt.NDArray[np.float32]


@dataclass(frozen=True)
class ModelSpec:
    """One scene model: its seed (scenes, initial weights and batches), training scenes and epochs."""

    name: str
    seed: int
    n_train: int
    epochs: int
    role: str  # "tune": the signals were chosen on it; "held-out": reported, never tuned on
    n_test: int = 200  # indexed held-out scenes: the collection searched


MODELS = (
    ModelSpec("A", seed=0, n_train=1500, epochs=20, role="tune"),
    ModelSpec("D", seed=3, n_train=2000, epochs=32, role="tune"),
    # small and briefly trained, like tests/retrieval/test_confidence.py's model: where the null sits closest
    ModelSpec("E", seed=4, n_train=1000, epochs=8, role="tune", n_test=64),
    ModelSpec("B", seed=1, n_train=2000, epochs=32, role="held-out"),
    ModelSpec("C", seed=2, n_train=2000, epochs=12, role="held-out"),
    ModelSpec("F", seed=5, n_train=1200, epochs=10, role="held-out", n_test=64),
)

_SUBJECTS = (
    "elephant", "accountant", "violinist", "submarine", "lawyer", "tractor", "penguin", "teapot",
    "astronaut", "helicopter", "grandmother", "goldfish", "volcano", "librarian", "snowman", "camel",
    "firefighter", "octopus", "saxophone", "parrot", "cathedral", "forklift", "kangaroo", "waiter",
)  # fmt: skip
_DOINGS = (
    "reading a letter", "eating noodles", "crossing a bridge", "waiting for a bus", "playing the piano",
    "sleeping under a blanket", "writing an essay", "climbing a ladder", "selling newspapers",
    "repairing a roof", "dancing at a wedding", "counting coins", "painting a fence", "swimming upstream",
    "arguing about politics", "baking bread",
)  # fmt: skip
_PLACES = (
    "at the airport", "in a crowded market", "during a snowstorm", "near the harbour", "after midnight",
    "in the library", "on a mountain road", "at a football match", "in the jungle", "inside a bakery",
)  # fmt: skip
_COLOURS = ("red", "blue", "green", "yellow", "purple", "orange")


def nonsense_queries(n: int, seed: int = 1234) -> list[str]:
    """`n` distinct sentences about nothing in a collection of coloured shapes (deterministic)."""
    rng = np.random.default_rng(seed)
    out: dict[str, None] = {}
    while len(out) < n:
        subject = _SUBJECTS[rng.integers(len(_SUBJECTS))]
        if rng.random() < 0.2:
            subject = f"{_COLOURS[rng.integers(len(_COLOURS))]} {subject}"
        article = "an" if subject[0] in "aeiou" else "a"
        text = f"{article} {subject} {_DOINGS[rng.integers(len(_DOINGS))]}"
        if rng.random() < 0.5:
            text += f" {_PLACES[rng.integers(len(_PLACES))]}"
        out.setdefault(text, None)
    return list(out)


# -- prepare: train, index, embed ------------------------------------------------------------------


def prepare(spec: ModelSpec, work: Path, n_nonsense: int) -> None:
    """Train one model, index its test scenes and store every embedding the signals need."""
    from retrieval.collection import Collection
    from retrieval.confidence import NULL_QUERIES
    from retrieval.demo.recipes import DEMO_SCENES, DEMO_TRAINING, ClipRecipe, train_scene_clip
    from retrieval.demo.synthetic import generate_scenes, query_for, write_scenes
    from retrieval.encoders import EncoderConfig, create_encoder
    from retrieval.ingest import IngestConfig, ingest

    root = work / spec.name
    if (root / "embeddings.npz").exists():
        print(f"model {spec.name}: already prepared in {root}")
        return
    cfg = replace(DEMO_SCENES, n_train=spec.n_train, n_val=100, n_test=spec.n_test, seed=spec.seed)
    began = time.perf_counter()
    jsonl = root / "scenes" / "captions.jsonl"
    trained = "kept from an earlier run"
    if not (root / "model" / "config.json").exists():
        jsonl = write_scenes(cfg, root / "scenes", progress=False)
        training = replace(DEMO_TRAINING, epochs=spec.epochs, patience=spec.epochs, seed=spec.seed)
        recipe = ClipRecipe(training=training, seed=spec.seed)
        result = train_scene_clip(jsonl, root / "model", recipe, device="cpu")
        trained = f"{len(result.step_losses)} steps, best val R@1 {result.best['t2i_r1']:.3f}"
    scenes = [s for s in generate_scenes(cfg) if s.split == "test"]
    test_dir = jsonl.parent / "images" / "test"
    with (test_dir / "captions.jsonl").open("w") as fh:
        for s in scenes:
            fh.write(json.dumps({"image": Path(s.path).name, "captions": list(s.captions)}) + "\n")
    encoder = create_encoder(EncoderConfig(model=str(root / "model"), device="cpu", precision="fp32"))
    shutil.rmtree(root / "data", ignore_errors=True)
    collection = Collection(root / "data")
    ingest(test_dir, collection, encoder, IngestConfig(progress=False))
    cat, info = collection.catalog, encoder.info
    ids, images = cat.sample_indexed_vectors(info.fingerprint, info.dim, 1_000_000)
    records = cat.get_images([int(i) for i in ids])
    by_name = {Path(records[int(i)].path).name: k for k, i in enumerate(ids)}
    caps = cat.all_captions()
    owner_row = {int(i): k for k, i in enumerate(ids)}
    # true queries: every scene's canonical caption first, then its other captions (no caption of the
    # held-out scenes fits another scene: `unambiguous_eval`), so small collections give 100+ as well
    pairs = [(query_for(s), s) for s in scenes] + [(c, s) for s in scenes for c in s.captions[1:]]
    true_texts = [t for t, _ in pairs]
    nonsense = nonsense_queries(n_nonsense)
    np.savez(
        root / "embeddings.npz",
        images=images.astype(np.float32),
        captions=encoder.encode_texts([c.text for c in caps]),
        caption_owner=np.asarray([owner_row[c.image_id] for c in caps], np.int64),
        true=encoder.encode_texts(true_texts),
        true_image=np.asarray([by_name[Path(s.path).name] for _, s in pairs], np.int64),
        nonsense=encoder.encode_texts(nonsense),
        null=encoder.encode_texts(list(NULL_QUERIES)),
    )
    (root / "queries.json").write_text(json.dumps({"true": true_texts, "nonsense": nonsense}, indent=1))
    collection.close()
    encoder.close()
    print(
        f"model {spec.name} (seed {spec.seed}, {spec.n_train} scenes, {spec.epochs} epochs; {trained}): "
        f"prepared in {time.perf_counter() - began:.0f} s"
    )


# -- signals: candidate confidences on stored embeddings ---------------------------------------------


def auc(pos: npt.NDArray[np.float64], neg: npt.NDArray[np.float64]) -> float:
    """ROC AUC: the chance that a random true query outscores a random nonsense one (ties count half)."""
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def _phi(z: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    from math import erf, sqrt

    return np.asarray([0.5 * (1.0 + erf(v / sqrt(2.0))) for v in np.ravel(z)], np.float64)


def _normal(null: npt.NDArray[np.float64], x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    return _phi((x - null.mean()) / max(null.std(ddof=1), 1e-6))


def _empirical(null: npt.NDArray[np.float64], x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Share of the null below x, with a half-count of ties, mapped into (0, 1) by (k + 0.5) / (n + 1)."""
    below = (null[None, :] < x[:, None]).sum(1) + 0.5 * (null[None, :] == x[:, None]).sum(1)
    return (below + 0.5) / (len(null) + 1)


def _gumbel(null: npt.NDArray[np.float64], x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Best-of-N scores follow an extreme-value law: Gumbel fitted by moments to the null."""
    scale = max(null.std(ddof=1), 1e-6) * np.sqrt(6.0) / np.pi
    loc = null.mean() - 0.5772156649 * scale
    return np.exp(-np.exp(-(x - loc) / scale))


def _upper_normal(null: npt.NDArray[np.float64], x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """A normal centred on the null's median with the spread of its upper half only: what matters is
    how far the null reaches upwards, and a long lower tail (sentences far from everything) must not
    widen it."""
    med = float(np.median(null))
    up = null[null > med] - med
    sd = float(np.sqrt(np.mean(up**2))) if len(up) else 0.0
    return _phi((x - med) / max(sd, 1e-6))


def _quantile_normal(null: npt.NDArray[np.float64], x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """A normal through the null's median and 90th percentile (so 0.9 falls where 90% of the null is)."""
    med, q90 = np.percentile(null, [50, 90])
    return _phi((x - med) / max(float(q90 - med) / 1.2815516, 1e-6))


@dataclass
class Stats:
    """Per-query statistics of one set of queries over the collection's images."""

    top1: npt.NDArray[np.float64]
    top2: npt.NDArray[np.float64]
    mean: npt.NDArray[np.float64]
    std: npt.NDArray[np.float64]
    tail: npt.NDArray[np.float64]  # mean of ranks 2..11: the query's near-best background

    @classmethod
    def of(cls, queries: F32, images: F32) -> Stats:
        s = np.sort(queries.astype(np.float64) @ images.astype(np.float64).T, axis=1)[:, ::-1]
        return cls(s[:, 0], s[:, 1], s.mean(1), s.std(1), s[:, 1:11].mean(1))

    def z(self) -> npt.NDArray[np.float64]:
        return (self.top1 - self.mean) / np.maximum(self.std, 1e-6)

    def margin(self) -> npt.NDArray[np.float64]:
        return (self.top1 - self.top2) / np.maximum(self.std, 1e-6)

    def gap(self) -> npt.NDArray[np.float64]:
        return (self.top1 - self.tail) / np.maximum(self.std, 1e-6)


def _caption_null(d: dict[str, F32]) -> npt.NDArray[np.float64]:
    """The collection's own captions shuffled across images: each caption's best score on an image
    other than its own (a caption that is about *something*, but not about that image)."""
    scores = d["captions"].astype(np.float64) @ d["images"].astype(np.float64).T
    scores[np.arange(len(scores)), d["caption_owner"]] = -np.inf
    return np.asarray(scores.max(1), np.float64)


def signal_table(d: dict[str, F32]) -> dict[str, tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]]:
    """Each candidate's confidence of the top hit, for (true queries, nonsense queries)."""
    imgs = d["images"]
    t, n, z0 = Stats.of(d["true"], imgs), Stats.of(d["nonsense"], imgs), Stats.of(d["null"], imgs)
    cap = _caption_null(d)
    out: dict[str, tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]] = {}
    score_fits = (
        ("normal", _normal), ("empirical", _empirical), ("gumbel", _gumbel),
        ("upper-half normal", _upper_normal), ("median-q90 normal", _quantile_normal),
    )  # fmt: skip
    for name, fn in score_fits:
        out[f"score, {name} null of sentences"] = (fn(z0.top1, t.top1), fn(z0.top1, n.top1))
    lt, ln, l0 = (-np.log1p(-np.minimum(x.top1, 1 - 1e-6)) for x in (t, n, z0))
    for name, fn in score_fits:
        out[f"-log(1 - score), {name} null of sentences"] = (fn(l0, lt), fn(l0, ln))
    out["score, normal null of shuffled captions"] = (_normal(cap, t.top1), _normal(cap, n.top1))
    out["score, empirical null of shuffled captions"] = (_empirical(cap, t.top1), _empirical(cap, n.top1))
    for stat in ("z", "margin", "gap"):
        null = getattr(z0, stat)()
        tv, nv = getattr(t, stat)(), getattr(n, stat)()
        label = {
            "z": "own z of top-1",
            "margin": "top-1 - top-2 / own spread",
            "gap": "top-1 - ranks 2-11 / spread",
        }
        for name, fn in (("normal", _normal), ("empirical", _empirical), ("gumbel", _gumbel)):
            out[f"{label[stat]}, {name} null"] = (fn(null, tv), fn(null, nv))
    return out


def load(work: Path, name: str) -> dict[str, F32]:
    with np.load(work / name / "embeddings.npz") as z:
        return {k: z[k] for k in z.files}


def print_signals(specs: list[ModelSpec], work: Path, threshold: float = 0.9) -> None:
    """One row per signal: AUC and confident shares per model (the tuning model first)."""
    tables = {m.name: signal_table(load(work, m.name)) for m in specs}
    head = " | ".join(f"{m.name} ({m.role}) AUC, true conf, nonsense flagged" for m in specs)
    print(f"| signal | {head} |")
    for key in next(iter(tables.values())):
        cells = []
        for m in specs:
            pos, neg = tables[m.name][key]
            cells.append(
                f"{auc(pos, neg):.3f}, {np.mean(pos >= threshold):.2f}, {np.mean(neg < threshold):.2f}"
            )
        print(f"| {key} | " + " | ".join(cells) + " |")


def export(spec: ModelSpec, work: Path, out: Path, n: int = 100) -> None:
    """The embeddings tests/retrieval/test_confidence.py checks the floors on: the collection, the first `n`
    true (canonical caption) and nonsense queries, and the null sentences they were encoded with."""
    from retrieval.confidence import NULL_QUERIES

    d = load(work, spec.name)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        out,
        images=d["images"],
        true=d["true"][:n],
        true_image=d["true_image"][:n],
        nonsense=d["nonsense"][:n],
        null=d["null"],
        null_sentences=np.asarray(NULL_QUERIES),
    )
    print(f"model {spec.name}: wrote {out} ({out.stat().st_size // 1024} KiB)")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "command", nargs="?", default="report", choices=("prepare", "signals", "report", "export")
    )
    parser.add_argument("--work", type=Path, default=Path("/tmp/clearsight-confidence-bench"))
    parser.add_argument("--models", default=",".join(m.name for m in MODELS), help="comma-separated names")
    parser.add_argument("--nonsense", type=int, default=150, help="nonsense queries per model (>= 100)")
    args = parser.parse_args(argv)
    specs = [m for m in MODELS if m.name in args.models.split(",")]
    if args.command == "prepare":
        for spec in specs:
            prepare(spec, args.work, args.nonsense)
        return 0
    missing = [m.name for m in specs if not (args.work / m.name / "embeddings.npz").exists()]
    if missing:
        print(f"models {missing} are not prepared in {args.work}: run the 'prepare' command first")
        return 2
    if args.command == "export":
        for spec in specs:
            export(spec, args.work, Path("tests/data") / f"confidence_{spec.name}.npz")
        return 0
    if args.command == "signals":
        print_signals(specs, args.work)
        return 0
    return report(specs, args.work)


def report(specs: list[ModelSpec], work: Path) -> int:
    """The product's figures: `Searcher` on each model's indexed test scenes, fp32, as users search."""
    from retrieval.encoders import EncoderConfig, create_encoder
    from retrieval.search import Query, Searcher

    print(
        "| model | role | training | top-1 right | true confident (first 10) | nonsense flagged (first 10) "
        "| true confident (all) | nonsense flagged (all) | AUC (true vs nonsense) |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for spec in specs:
        root = work / spec.name
        queries = json.loads((root / "queries.json").read_text())
        encoder = create_encoder(EncoderConfig(model=str(root / "model"), device="cpu", precision="fp32"))
        searcher = Searcher.open(root / "data", encoder=encoder)
        truth = load(work, spec.name)["true_image"]
        results = {
            k: [searcher.search(Query(text=t, top_k=3)) for t in queries[k]] for k in ("true", "nonsense")
        }
        ids = searcher.collection.catalog.sample_indexed_vectors(
            encoder.info.fingerprint, encoder.info.dim, 10**6
        )[0]
        right = np.mean([r.results[0].id == int(ids[i]) for r, i in zip(results["true"], truth, strict=True)])
        conf = {
            k: np.asarray([r.results[0].confidence or 0.0 for r in v], np.float64) for k, v in results.items()
        }
        sure = {k: np.asarray([not r.no_confident_match for r in v]) for k, v in results.items()}
        searcher.close()
        n_t, n_n = len(sure["true"]), len(sure["nonsense"])
        print(
            f"| {spec.name} | {spec.role} | seed {spec.seed}, {spec.n_train} scenes, {spec.epochs} epochs "
            f"| {right:.2f} | {sure['true'][:10].sum()}/10 | {(~sure['nonsense'][:10]).sum()}/10 "
            f"| {sure['true'].sum()}/{n_t} | {(~sure['nonsense']).sum()}/{n_n} "
            f"| {auc(conf['true'], conf['nonsense']):.3f} over {n_t} + {n_n} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
