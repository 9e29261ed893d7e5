"""Explanations: types, prompts, the chain, its cache, regions in words and the LLM backends."""
