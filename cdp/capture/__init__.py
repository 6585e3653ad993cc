"""Capture sources: where the writes that go into the journal come from."""
