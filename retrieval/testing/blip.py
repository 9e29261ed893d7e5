"""The earlier home of `retrieval.demo.blip` (moved when the demo's fixtures got their own package):
scripts and checks written against `retrieval.testing.blip` keep working. New code imports
`retrieval.demo.blip`."""

from retrieval.demo.blip import *  # noqa: F403
