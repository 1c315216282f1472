"""The one way this project replaces an attribute of torch, Megatron-core, DeepSpeed or
emerging-optimizers at run time, and the inventory of every such replacement.

A module that patches declares each patch once, at import time, with :func:`declare`
(what is replaced, by what, why, when, and the version it was verified against), and
makes it only through :func:`replace` / :func:`replaced` / :func:`replace_item`, which
refuse an undeclared patch. :func:`inventory` renders the declarations as the table of
``patches/README.md``; ``python tools/patch_inventory.py --write`` regenerates it
and the suite fails when the README, the declarations or the code
disagree (a direct ``setattr`` on a foreign module or class anywhere else in the package
fails it too). :func:`applied` lists what is replaced right now.
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Tuple

# The versions every declared patch was verified against (the pins of requirements.txt).
VERIFIED = {"torch": "2.13.0", "megatron-core": "0.19.2", "deepspeed": "0.19.8",
            "emerging-optimizers": "0.3.0"}
# Packages whose attributes only this module may replace.
FOREIGN = ("torch", "megatron", "deepspeed", "emerging_optimizers", "transformers")

BEGIN, END = "<!-- BEGIN generated: python tools/patch_inventory.py --write -->", \
    "<!-- END generated -->"


class PatchError(RuntimeError):
    pass


@dataclass(frozen=True)
class Patch:
    name: str          # unique id, used by replace()
    package: str       # a key of VERIFIED: whose attribute is replaced
    target: str        # the attribute(s) replaced
    replacement: str   # what they become
    why: str
    when: str          # when it is applied and undone
    module: str        # the declaring module


_DECLARED: Dict[str, Patch] = {}
_APPLIED: List[Tuple[str, str]] = []     # (patch name, attribute), in order


def declare(name: str, *, package: str, target: str, replacement: str, why: str,
            when: str) -> str:
    """Record a patch (once per process; call at import time). Returns ``name``."""
    if package not in VERIFIED:
        raise PatchError(f"patch {name!r}: unknown package {package!r} (one of {VERIFIED}).")
    module = sys._getframe(1).f_globals.get("__name__", "?")
    patch = Patch(name, package, target, replacement, why, when, module)
    if _DECLARED.setdefault(name, patch) != patch:
        raise PatchError(f"patch {name!r} is declared twice, differently.")
    return name


def _check(patch: str) -> None:
    if patch not in _DECLARED:
        raise PatchError(f"undeclared patch {patch!r}: declare() it (with what it replaces "
                         f"and why) in the module that applies it, then regenerate "
                         f"patches/README.md (python tools/patch_inventory.py --write).")


def _label(owner: Any, attr: str) -> str:
    base = getattr(owner, "__qualname__", None) or getattr(owner, "__name__", None) \
        or type(owner).__qualname__
    module = getattr(owner, "__module__", None) if not hasattr(owner, "__path__") else None
    return f"{module + '.' if module and base != module else ''}{base}.{attr}"


def replace(owner: Any, attr: str, value: Any, *, patch: str, label: str = "") -> Any:
    """``setattr(owner, attr, value)`` for the declared ``patch``; returns the original
    (None if there was none)."""
    _check(patch)
    original = getattr(owner, attr, None)
    setattr(owner, attr, value)
    _APPLIED.append((patch, label or _label(owner, attr)))
    return original


def restore(owner: Any, attr: str, original: Any, *, patch: str) -> None:
    """Undo :func:`replace`."""
    _check(patch)
    setattr(owner, attr, original)
    for i in range(len(_APPLIED) - 1, -1, -1):
        if _APPLIED[i][0] == patch:
            del _APPLIED[i]
            break


@contextlib.contextmanager
def replaced(owner: Any, attr: str, value: Any, *, patch: str) -> Iterator[None]:
    """:func:`replace` for the duration of a ``with`` block."""
    original = replace(owner, attr, value, patch=patch)
    try:
        yield
    finally:
        restore(owner, attr, original, patch=patch)


def replace_item(mapping: dict, key: Any, value: Any, *, patch: str, label: str) -> None:
    """``mapping[key] = value`` in a foreign registry (a dict), for the declared ``patch``."""
    _check(patch)
    mapping[key] = value
    if (patch, label) not in _APPLIED:
        _APPLIED.append((patch, label))


def declared() -> List[Patch]:
    return sorted(_DECLARED.values(), key=lambda p: (p.module, p.name))


def applied() -> List[Tuple[str, str]]:
    """(patch, attribute) of every replacement in force now, in the order made."""
    return list(_APPLIED)


def import_all() -> None:
    """Import every module of the package, so that every patch is declared."""
    import importlib
    import pkgutil

    package = __name__.rpartition(".")[0] or "megatron_asyncmesh"
    for info in pkgutil.walk_packages([os.path.dirname(os.path.abspath(__file__))],
                                      package + "."):
        importlib.import_module(info.name)


def inventory() -> str:
    """Markdown: one table per declaring module."""
    lines = [BEGIN, "",
             "Verified against: " + ", ".join(f"{k} {v}" for k, v in VERIFIED.items())
             + " (the pins in `requirements.txt`).", ""]
    by_module: Dict[str, List[Patch]] = {}
    for p in declared():
        by_module.setdefault(p.module, []).append(p)
    cell = lambda s: s.replace("|", "\\|").replace("\n", " ")
    for module, patches in by_module.items():
        lines += [f"### `{module}`", "",
                  "| patch | package | replaced | by | when | why |", "|---|---|---|---|---|---|"]
        lines += [f"| `{p.name}` | {p.package} {VERIFIED[p.package]} | {cell(p.target)} | "
                  f"{cell(p.replacement)} | {cell(p.when)} | {cell(p.why)} |" for p in patches]
        lines.append("")
    lines.append(END)
    return "\n".join(lines)


README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "patches", "README.md")


def readme_section(path: str = README) -> str:
    with open(path) as f:
        text = f.read()
    if BEGIN not in text or END not in text:
        return ""
    return text[text.index(BEGIN):text.index(END) + len(END)]


def write_readme(path: str = README) -> int:
    """Rewrite the generated section of patches/README.md; returns the patch count."""
    import_all()
    table = inventory()
    with open(path) as f:
        text = f.read()
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + table + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n" + table + "\n"
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)
    return len(_DECLARED)
