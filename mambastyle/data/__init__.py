"""Formats and I/O for images and shards (no Ray, no DVC)."""

# PNG's signature: written by images.encode_png and checked by the fast decoder in _png, which
# images loads only when a PNG arrives (it compiles numba kernels), so neither owns the other.
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
