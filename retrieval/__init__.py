"""Clearsight's retrieval library: encoders, catalog, FAISS index, ingest and search.

It never imports `explainer`; notebooks can use it on its own:

    from retrieval import Searcher, Query
    s = Searcher.open("~/.local/share/clearsight")
    s.search(Query(text="a dog on a beach", top_k=5)).results
"""

from .collection import Collection
from .encoders import Encoder, EncoderConfig, create_encoder, list_encoders
from .ingest import IngestConfig, IngestSummary, ingest
from .search import CaptionHit, Hit, Query, Searcher, SearchResult, load_query_image

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
    "ingest",
    "list_encoders",
    "load_query_image",
]
