"""The pipeline's core: plan (what to write), engine (how: budgeted, journaled,
resumable), budget, journal, staging and integrity checks.

May import `util`, `formats`, `errors` and `frontend`; the `Source` and `Sink`
contracts only for type checking. Nothing here knows a file format.
"""
