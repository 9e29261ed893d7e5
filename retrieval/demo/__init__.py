"""Shipped with the product: the offline demo's synthetic scenes, tiny CLIP and BLIP architectures and
the recipes that train them on the CPU. `clearsight demo` runs on them, and tests and benches use them
as fixtures, so what the tests exercise is what a user without downloaded weights gets."""
