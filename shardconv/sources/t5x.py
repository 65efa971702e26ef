"""t5x TensorStore checkpoints: a msgpack ``checkpoint`` file whose leaves are inline
values or TensorStore specs (``{"driver": "zarr", "kvstore": {"driver": "gfile",
"path": "target.encoder.x/"}, "metadata": {...}}``).

The msgpack file is walked by ``flax_msgpack``; each spec's path is rewritten to a local
``file`` kvstore under the checkpoint directory (a path leading outside it is refused), and
when the array has no ``.zarray`` the spec's own metadata is used (``assume_metadata``);
``formats.tensorstore_arrays`` resolves and reads the arrays. A model directory of
``checkpoint_N/`` steps opens the latest, or ``step=N``. A legacy Orbax item without
``_METADATA`` (a msgpack ``checkpoint`` with ``PLACEHOLDER://`` leaves) is read here too: the
placeholders name the array directories beside the file. The format records no checksums.
"""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import SourceError
from ..frontend import option_name
from .flax_msgpack import FlaxMsgpackSource
from .probes import is_t5x_checkpoint
from .steps import choose_step


class T5xSource(FlaxMsgpackSource):
    """A t5x checkpoint directory (``checkpoint`` + array directories) or a directory of
    ``checkpoint_N`` steps; the msgpack file itself is read by FlaxMsgpackSource."""

    format = "t5x"

    def __init__(self, path: str | os.PathLike, step: int | None = None) -> None:
        p = Path(path)
        if p.name == "checkpoint" and p.is_file():
            if step is not None:
                raise SourceError(f"{p}: {option_name('step')} applies to a directory of checkpoint_N steps, "
                                  "not to one file")
            f = p
        else:
            f = choose_step(p, step, is_t5x_checkpoint, "t5x") / "checkpoint"
        super().__init__(f)
