"""Importing a third-party package without the costly imports it makes for no use of ours.

Start-up is on the critical path of every run (a no-op sync of a 10,000-file tree takes about
0.2 s, of which imports are half), so tens of milliseconds of imports that only serve type
hints or a version string are worth hiding.
"""

from __future__ import annotations

import sys
import types


def import_hiding(name: str, hidden: dict[str, types.ModuleType | None]) -> types.ModuleType:
    """Import package `name` while each module named in `hidden` is replaced by its stand-in (a
    small module, or None: "not importable"). Names already imported are left as they are. The
    stand-ins are taken out again afterwards, so any later importer gets the real module. If the
    import fails with them in place, whatever it half-imported is dropped and `name` is imported
    plainly (a newer release that needs more than the stand-in offers still works, just slower)."""
    hidden = {k: v for k, v in hidden.items() if k not in sys.modules}
    before = set(sys.modules)
    sys.modules.update(hidden)
    try:
        __import__(name)
        return sys.modules[name]
    except Exception:
        for k in set(sys.modules) - before:
            del sys.modules[k]
    finally:
        for k, v in hidden.items():
            if sys.modules.get(k) is v:
                del sys.modules[k]
    __import__(name)
    return sys.modules[name]


def stand_in(name: str, **attrs: object) -> types.ModuleType:
    """A module called `name` holding just `attrs`."""
    m = types.ModuleType(name)
    m.__dict__.update(attrs)
    return m
