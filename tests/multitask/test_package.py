"""``lmloss.multitask`` exports exactly what its modules export."""

from __future__ import annotations

import lmloss.multitask as package
from lmloss.multitask import composite, curriculum, weighting


def test_package_exports_the_modules_public_names():
    modules = (composite, curriculum, weighting)
    assert sorted(package.__all__) == sorted(name for module in modules for name in module.__all__)
    assert len(set(package.__all__)) == len(package.__all__)
    for module in modules:
        for name in module.__all__:
            assert getattr(package, name) is getattr(module, name)


def test_star_import_gives_the_exported_names_only():
    namespace: dict[str, object] = {}
    exec("from lmloss.multitask import *", namespace)
    assert sorted(k for k in namespace if k != "__builtins__") == sorted(package.__all__)
