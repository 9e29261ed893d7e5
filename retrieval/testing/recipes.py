"""The earlier home of `retrieval.demo.recipes` (moved when the demo's fixtures got their own package):
scripts and checks written against `retrieval.testing.recipes` keep working. New code imports
`retrieval.demo.recipes`."""

from retrieval.demo.recipes import *  # noqa: F403
