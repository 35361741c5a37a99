"""Generators for the bad-input corpus (tests/test_bad_inputs.py): malformed images, captions,
samples and shards, all built in memory or in a tmp dir by the test itself (nothing committed)."""
