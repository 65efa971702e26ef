"""Byte formats with no conversion policy: protobuf wire, SSTable and TF bundle
entries, zip64, npy headers, Zarr dtypes and chunk streams, TensorStore I/O.

May import `util`, `errors` and `frontend`; never `core`, `sources`, `sinks`
or `mapping`.
"""
