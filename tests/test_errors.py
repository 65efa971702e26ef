"""Every error class survives pickling (how a worker process hands it to the coordinator):
the same class, the same one-line message, the same attributes."""
from __future__ import annotations

import pickle

import pytest

from shardconv import errors

CLASSES = [c for c in vars(errors).values()
           if isinstance(c, type) and issubclass(c, errors.ShardconvError)]

ARGS = {errors.PlanError: (["a: first", "b: second"], "src.npz"),
        errors.MissingDependencyError: ("tensorstore", "zarr", "the Zarr output")}


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_errors_pickle_as_themselves(cls):
    e = cls(*ARGS.get(cls, ("x.npz: tensor 'w': something is wrong",)))
    back = pickle.loads(pickle.dumps(e))
    assert type(back) is cls and str(back) == str(e) and back.exit_code == e.exit_code
    assert vars(back) == vars(e)


def test_a_plan_error_keeps_its_problems():
    back = pickle.loads(pickle.dumps(errors.PlanError(["one", "two"])))
    assert back.problems == ["one", "two"]
