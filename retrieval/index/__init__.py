"""The index package: every index kind, the store that versions them, and the code that sizes,
chooses, tunes and fills them.

    kinds         the one table of index kinds (factory rule, bytes, training minimum, knobs, opener)
    params        knobs, their defaults and the sizing rules (IVF lists, PQ bytes) every kind shares
    base          the interface every kind implements (`Index`), vector checks, durable writes
    faiss_index   FAISS indexes held in memory (flat, hnsw, ivf, ivfpq, factory strings)
    ondisk        the on-disk IVF's files: build, memory-mapped search; ondisk_store: as an `Index`
    store         the manifest and the versioned, atomically switched index directory
    auto          `--index auto`: a kind from the collection's size and a memory budget
    tuning        `tune-index`: candidates measured on the collection, one recommended
    sync          the catalog→index sync every writer ends with
    result_cache  whole-query cache of the searcher

Nothing is re-exported here: importing the store must not import the sync (which imports the
catalog and the encoders), and modules of this package import each other by their full names.
"""
