"""Public names that load on first use (PEP 562), for the packages whose ``__init__`` would
otherwise import everything they export: ``import autotls`` must stay cheap so that the
command line can answer ``--help`` without loading aiohttp, SQLAlchemy or cryptography.

A package keeps three things side by side: its ``TYPE_CHECKING`` imports (what mypy and
readers see), ``_EXPORTS`` (name -> defining module, what runs) and ``__all__``;
``tests/test_startup.py`` checks that they agree.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Collection, Mapping
from typing import Any


def lazy_exports(
    package: str, exports: Mapping[str, str], public: Collection[str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The ``__getattr__`` and ``__dir__`` for ``package``'s ``__init__``."""

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        setattr(sys.modules[package], name, value)  # later lookups skip this function
        return value

    def __dir__() -> list[str]:
        return sorted({*vars(sys.modules[package]), *public})

    return __getattr__, __dir__
