"""Baseline PTQ methods, each a plain function registered with `pqjax.register_method`.

Every module in this package is imported here, so a new baseline only needs its own file.
"""

import importlib
import pkgutil

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
    importlib.import_module(f"{__name__}.{_info.name}")
