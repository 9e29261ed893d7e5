"""The card model and the one pipeline that turns hits into cards."""
