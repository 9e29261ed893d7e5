"""Clearsight's retrieval library: encoders, catalog, FAISS index, ingest and search.

It never imports `explainer`; notebooks can use it on its own:

    from retrieval import Searcher, Query
    s = Searcher.open("~/.local/share/clearsight")
    s.search(Query(text="a dog on a beach", top_k=5)).results

Indexing a folder is `retrieval.ingest.ingest`: the function is deliberately not re-exported here,
because a package attribute named `ingest` would hide the submodule `retrieval.ingest` (then
`import retrieval.ingest as m` or `monkeypatch.setattr("retrieval.ingest.X", ...)` get the function).

    from retrieval.ingest import ingest
"""

from retrieval.collection import Collection
from retrieval.encoders import Encoder, EncoderConfig, create_encoder, list_encoders
from retrieval.ingest import IngestConfig, IngestSummary
from retrieval.search import CaptionHit, Hit, Query, Searcher, SearchResult, load_query_image

__all__ = [
    "CaptionHit",
    "Collection",
    "Encoder",
    "EncoderConfig",
    "Hit",
    "IngestConfig",
    "IngestSummary",
    "Query",
    "SearchResult",
    "Searcher",
    "create_encoder",
    "list_encoders",
    "load_query_image",
]
