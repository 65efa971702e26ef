"""Shared conformance tests: every source subclasses ``SourceTests``, every sink ``SinkTests``.

Like ``zarr.testing.store``: one definition of what a backend must do, run
against each backend. Importing this package needs pytest.
"""
