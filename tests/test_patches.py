"""Every runtime patch of a foreign package is declared, made through patching.py, and
listed in patches/README.md (generated from the declarations)."""

import ast
import os

import pytest

from megatron_asyncmesh import patching

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       "megatron_asyncmesh")


def test_readme_inventory_is_the_declarations():
    """patches/README.md's inventory is exactly what the code declares (regenerate with
    ``python tools/patch_inventory.py --write``), and every declared patch is
    applied somewhere through patching.replace / replaced / replace_item / restore."""
    patching.import_all()
    declared = patching.declared()
    assert len(declared) >= 10
    assert patching.readme_section() == patching.inventory(), \
        "patches/README.md is stale: run python tools/patch_inventory.py --write"
    declared_as, applied_with = {}, set()
    for root, _, files in os.walk(PACKAGE):
        for f in files:
            if not f.endswith(".py") or f == "patching.py":
                continue
            with open(os.path.join(root, f)) as fh:
                tree = ast.parse(fh.read())
            for node in ast.walk(tree):
                if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call) and \
                        getattr(node.value.func, "attr", None) == "declare":
                    declared_as[node.value.args[0].value] = node.targets[0].id
                # patching.replace(..., patch=NAME) and the CPU layer's _set(..., NAME)
                if isinstance(node, ast.Call) and getattr(node.func, "attr", "") != "declare":
                    applied_with.update(a.id for a in [*node.args,
                                                       *(k.value for k in node.keywords)]
                                        if isinstance(a, ast.Name) and a.id.endswith("_PATCH"))
    for p in declared:
        assert p.package in patching.VERIFIED
        assert declared_as.get(p.name) in applied_with, (p.name, "declared, never applied")


def _foreign_names(tree) -> set:
    """Names bound by importing a foreign package (module aliases and imported names)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in patching.FOREIGN:
                    out.add((a.asname or a.name).split(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.module and \
                node.module.split(".")[0] in patching.FOREIGN:
            out.update(a.asname or a.name for a in node.names)
    return out


def _root(node):
    while isinstance(node, (ast.Attribute, ast.Subscript)):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def undeclared_patches(path: str) -> list:
    """Assignments to an attribute or item of a foreign module / class (``torch.x = ...``,
    ``setattr(schedules, ...)``, ``eo._REGISTRY[k] = ...``) outside patching.py."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    foreign, found = _foreign_names(tree), []
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            targets = [t for tgt in targets
                       for t in (tgt.elts if isinstance(tgt, ast.Tuple) else [tgt])]
            targets = [t for t in targets if isinstance(t, (ast.Attribute, ast.Subscript))]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and \
                node.func.id in ("setattr", "delattr") and node.args:
            targets = [node.args[0]]
        for t in targets:
            if _root(t) in foreign:
                found.append(f"{os.path.relpath(path, PACKAGE)}:{node.lineno}")
    return found


def test_no_patch_bypasses_patching():
    files = [os.path.join(root, f) for root, _, names in os.walk(PACKAGE) for f in names
             if f.endswith(".py") and f != "patching.py"]
    assert len(files) > 30
    found = [hit for path in files for hit in undeclared_patches(path)]
    assert not found, f"patches made without patching.replace (declare them): {found}"


def test_the_scan_and_the_registry_refuse_what_they_should(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from megatron.core.pipeline_parallel import schedules\n"
                   "import torch.distributed as dist\n"
                   "schedules.forward_step = None\n"
                   "setattr(dist, 'all_gather', None)\n"
                   "x = {}\nx['a'] = 1\n")
    assert [h.split(":")[1] for h in undeclared_patches(str(bad))] == ["3", "4"]

    class Owner:
        attr = 1

    with pytest.raises(patching.PatchError, match="undeclared patch 'nobody-declared-me'"):
        patching.replace(Owner, "attr", 2, patch="nobody-declared-me")
    assert Owner.attr == 1
