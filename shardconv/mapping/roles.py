"""What a source tensor is: a model parameter, optimizer state, an EMA average, or bookkeeping.

Sources that know (the TF2 object graph) put ``role``, ``model_name`` and
``ema_of`` in ``TensorInfo.extra``. For the rest (TF1 names, flat trees) the
naming conventions of the common trainers decide.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from ..sources.base import TensorInfo

#: TF1 slot suffixes (tf.compat.v1.train optimizers), Keras/optax names, Mesh TF Adafactor slots.
_OPT_SLOT = re.compile(
    r"(.+)/(Adam(?:_\d+)?|Momentum|RMSProp(?:_\d+)?|Adagrad(?:DA)?|Adadelta(?:_\d+)?|Ftrl(?:_\d+)?|"
    r"AdamW(?:_\d+)?|LAMB(?:_\d+)?|LARS|Nadam(?:_\d+)?|adam_[mv]|accumulator|gradient_accumulator|"
    r"\.OPTIMIZER_SLOT/.*)$"
    r"|(.+)_slot_(?:v|vr|vc|m)$")
_OPT_NAME = re.compile(r"^(global_step|beta[12]_power|(?:.*/)?(?:beta[12]_power|learning_rate|iterations?)|optimizer/.*)$")
_EMA = re.compile(r"^(?P<base>.+)/ExponentialMovingAverage$")


@dataclass(frozen=True)
class Role:
    kind: str          # param | optimizer | ema | meta
    name: str          # model-facing name
    ema_of: str | None = None


def role_of(t: TensorInfo) -> Role:
    e = t.extra or {}
    if "role" in e:
        return Role(e["role"], e.get("model_name") or t.name, e.get("ema_of"))
    m = _EMA.match(t.name)
    if m:
        return Role("ema", t.name, m.group("base"))
    if _OPT_SLOT.match(t.name) or _OPT_NAME.match(t.name):
        return Role("optimizer", t.name)
    return Role("param", t.name)
