"""Clearsight application layer: captions, explanations, cards, server and CLI."""
