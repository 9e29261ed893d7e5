"""Fixtures, not product code: tiny models and synthetic scenes for tests, benches and the demo."""
