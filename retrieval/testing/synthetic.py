"""The earlier home of `retrieval.demo.synthetic` (moved when the demo's fixtures got their own package):
scripts and checks written against `retrieval.testing.synthetic` keep working. New code imports
`retrieval.demo.synthetic`."""

from retrieval.demo.synthetic import *  # noqa: F403
