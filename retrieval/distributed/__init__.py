"""The Ray engine: distributed ingest, on-disk index shards filled on the cluster, sharded search.

Ray is imported only inside this package's functions, and nothing outside it imports the package
unless `--engine ray` is asked for, so the embedded default never loads Ray.
"""
