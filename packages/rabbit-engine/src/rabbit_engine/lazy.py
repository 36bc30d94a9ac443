"""Package attributes imported on first use (PEP 562), for packages whose modules differ in cost.

`rabbit_engine` and `rabbit_engine.quant` export names from modules that import torch and
transformers next to ones that do not (`cgroup`, `options`, the compression scheme): importing
the package must not pay for what the caller does not use.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(
    package: str, exports: Mapping[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """`__getattr__` and `__dir__` for `package`, whose `exports` map a name to the module (dotted,
    absolute) that defines it; a name is imported once, then cached in the package's globals."""
    namespace = importlib.import_module(package).__dict__

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value  # later lookups skip this function
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *exports})

    return __getattr__, __dir__
