"""The earlier home of `retrieval.demo.tiny` (moved when the demo's fixtures got their own package):
scripts and checks written against `retrieval.testing.tiny` keep working. New code imports
`retrieval.demo.tiny`."""

from retrieval.demo.tiny import *  # noqa: F403
