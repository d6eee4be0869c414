"""Every package says what it exports, and exports what it says (after trio's test_exports).

For every package and subpackage of ours: each name in ``__all__`` exists, none is listed
twice, and every public name the package's ``__init__`` binds (no leading underscore; not
a submodule, not a ``__future__`` feature) is in ``__all__``. For every other module of
the product packages, each name in its ``__all__`` exists.
"""

from __future__ import annotations
import __future__

import importlib
import pkgutil
import types

import pytest

#: the type of ``from __future__ import annotations``'s binding
_FUTURE_FEATURE = type(__future__.annotations)
#: the product packages (bench and tests are programs, not libraries)
ROOTS = ("crcmath", "protocol", "reliablewriter", "faultnet", "proxy")


def _modules() -> list[tuple[str, bool]]:
    """(name, is a package) for every module under the roots, but ``__main__`` ones."""
    found = []
    for root in ROOTS:
        package = importlib.import_module(root)
        found.append((root, True))
        for info in pkgutil.walk_packages(package.__path__, prefix=f"{root}."):
            if info.name.rsplit(".", 1)[-1] != "__main__":
                found.append((info.name, info.ispkg))
    return found


MODULES = _modules()
PACKAGES = [name for name, is_package in MODULES if is_package]


def test_every_room_is_found() -> None:
    assert {"faultnet.gcs", "proxy.client", "proxy.server", "proxy.chaos", "proxy.cli"} <= set(
        PACKAGES
    )


@pytest.mark.parametrize("name", [name for name, _ in MODULES])
def test_every_name_in_all_exists_once(name: str) -> None:
    module = importlib.import_module(name)
    exported = getattr(module, "__all__", None)
    if exported is None:
        assert name not in PACKAGES, f"package {name} has no __all__"
        return
    assert [n for n in exported if not hasattr(module, n)] == []
    assert len(set(exported)) == len(exported), f"{name}.__all__ lists a name twice"


def _public_names(module: types.ModuleType) -> set[str]:
    return {
        name
        for name, value in vars(module).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType | _FUTURE_FEATURE)
    }


@pytest.mark.parametrize("name", PACKAGES)
def test_every_public_name_of_a_package_is_in_its_all(name: str) -> None:
    package = importlib.import_module(name)
    assert sorted(_public_names(package) - set(package.__all__)) == []
