"""Utilities with no policy: sizes, dtypes, checksums, file I/O that fails with
our own errors, and link-safe filesystem operations.

May import only `errors` and `frontend`.
"""
