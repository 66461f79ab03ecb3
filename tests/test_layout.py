"""The package's layout: the modules that moved into wings in 0.2 still import under their old
names for one release, as the very modules they became, with a DeprecationWarning."""

from __future__ import annotations

import importlib
import sys

import pytest

import lenet_xp


@pytest.mark.parametrize("old", sorted(lenet_xp.MOVED))
def test_an_old_module_name_imports_the_moved_module(old):
    sys.modules.pop(f"lenet_xp.{old}", None)
    with pytest.warns(DeprecationWarning, match=f"lenet_xp.{old} moved to lenet_xp."):
        module = importlib.import_module(f"lenet_xp.{old}")
    assert module is importlib.import_module(f"lenet_xp.{lenet_xp.MOVED[old]}")


def test_the_documented_entry_points_still_import():
    from lenet_xp import LeNet5, get_device, loss_and_grads, to_device  # noqa: F401
    from lenet_xp.backend import use_device  # noqa: F401
    from lenet_xp.bench import load_train_split  # noqa: F401
    from lenet_xp.data import DeviceSplit  # noqa: F401
    from lenet_xp.optim import Adam, make_optimizer  # noqa: F401
    from lenet_xp.predict import classify, predict  # noqa: F401
    from lenet_xp.report import write_report  # noqa: F401
    from lenet_xp.train import CONFIG_KEYS, RECIPES, build_parser, fit, train_epoch  # noqa: F401


def test_an_unknown_module_is_still_an_import_error():
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("lenet_xp.no_such_module")
