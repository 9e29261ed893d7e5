"""Datasets, retrieval metrics, evaluation and contrastive fine-tuning of the encoder."""
