"""Captions: the BLIP captioner and its content-hash cache in the catalog."""
