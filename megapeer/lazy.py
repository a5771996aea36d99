"""Lazy package attributes: names that load their submodule on first use (PEP 562)."""
import importlib


def lazy_getattr(package: str, table: dict):
    """A module `__getattr__` for `package`: `table` maps each name to its submodule."""

    def __getattr__(name):
        if name in table:
            return getattr(importlib.import_module(f"{package}.{table[name]}"), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
