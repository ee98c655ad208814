"""Package exports imported when first used (PEP 562), so importing one room of a package (a served model
imports ``tracking.served_model``) does not import every other room and what those import (Ray)."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(package: str, exports: Mapping[str, str], namespace: dict) -> Callable[[str], Any]:
    """The ``__getattr__`` of ``package``: ``exports`` maps each exported name to the module defining it;
    the first use imports that module and keeps the value in ``namespace`` (the package's globals)."""

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(exports[name]), name)
        namespace[name] = value
        return value

    return __getattr__
