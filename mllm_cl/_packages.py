"""The repository's ``callbacks/`` and ``data_modules/`` folders as ``mllm_cl.callbacks`` and ``mllm_cl.data_modules``.

An install puts them there (``pyproject.toml``, ``[tool.setuptools.package-dir]``), so a user's own
``callbacks.py`` or ``data_modules.py`` in the working directory never stands in for them. ``install()``
(run on import, by ``import mllm_cl``) adds two finders at the end of ``sys.meta_path``, asked only for a name
nothing else finds:

- in a source checkout used without installing it, ``mllm_cl.callbacks`` and ``mllm_cl.data_modules``
  from the folders beside ``mllm_cl/``;
- the old top-level names (``callbacks.cmoe.ProbeStatistics``, ``data_modules.TaskSequence``, in a
  config's ``class_path`` or an import) as aliases of the same modules, with a ``DeprecationWarning``.
  A module of that name of the user's own comes first and stays theirs.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
import warnings
from pathlib import Path

#: The repository's package folders and the names they are installed under.
MAPPED = {"callbacks": "mllm_cl.callbacks", "data_modules": "mllm_cl.data_modules"}
_ROOT = Path(__file__).resolve().parent.parent


class _Checkout(importlib.abc.MetaPathFinder):
    """``mllm_cl.callbacks`` / ``mllm_cl.data_modules`` from the folders of a source checkout."""

    def find_spec(self, fullname: str, path=None, target=None) -> importlib.machinery.ModuleSpec | None:
        folder = next((old for old, new in MAPPED.items() if new == fullname), None)
        if folder is None or not (_ROOT / "pyproject.toml").is_file():  # installed: the install maps them
            return None
        init = _ROOT / folder / "__init__.py"
        if not init.is_file():
            return None
        return importlib.util.spec_from_file_location(fullname, init, submodule_search_locations=[str(init.parent)])


class _OldName(types.ModuleType):
    """``callbacks`` / ``data_modules``: attributes read from the ``mllm_cl`` package of the same folder.
    Its ``__path__`` is empty, so its submodules come from ``_OldNames`` as the real modules."""

    def __init__(self, name: str, real: types.ModuleType) -> None:
        super().__init__(name, real.__doc__)
        self._real = real
        self.__path__: list[str] = []
        self.__all__ = list(getattr(real, "__all__", ()))

    def __getattr__(self, attr: str):
        return getattr(self._real, attr)


def old_name(name: str) -> _OldName:
    """The alias module for the old top-level ``name``; warns that the name is deprecated."""
    warnings.warn(f"the top-level package {name!r} is {MAPPED[name]!r} now (a {name}.py of your own would shadow "
                  f"it): write {MAPPED[name]}.X for {name}.X in class paths and imports", DeprecationWarning,
                  stacklevel=3)
    return _OldName(name, importlib.import_module(MAPPED[name]))


def adopt_old_name(name: str) -> None:
    """The folder was imported by its old top-level ``name`` (a checkout on ``sys.path``): let that
    name be the alias, so its classes are ``mllm_cl``'s and not a second copy."""
    sys.modules[name] = old_name(name)


class _OldNames(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """The old names and their submodules, where nothing else provides them."""

    def find_spec(self, fullname: str, path=None, target=None) -> importlib.machinery.ModuleSpec | None:
        top, _, rest = fullname.partition(".")
        if top not in MAPPED or (rest and not isinstance(sys.modules.get(top), _OldName)):
            return None  # not ours, or a submodule of a package of that name that is someone else's
        return importlib.machinery.ModuleSpec(fullname, self, is_package=not rest)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        return None if "." in spec.name else old_name(spec.name)

    def exec_module(self, module: types.ModuleType) -> None:
        top, _, rest = module.__name__.partition(".")
        if rest:  # the real module stands under the old name: the import returns what sys.modules holds
            sys.modules[module.__name__] = importlib.import_module(f"{MAPPED[top]}.{rest}")


_FINDERS = (_Checkout(), _OldNames())


def install() -> None:
    """Add the finders to the end of ``sys.meta_path`` (once)."""
    for finder in _FINDERS:
        if finder not in sys.meta_path:
            sys.meta_path.append(finder)


install()
