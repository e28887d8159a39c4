"""Formats and I/O for images and shards (no Ray, no DVC)."""
