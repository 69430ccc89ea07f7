"""The package's layers (refimpl/__init__.py): every import of every module, parsed.

A module of refimpl imports from its own package and from the packages
listed before it in refimpl/__init__.py's docstring, never from one listed
after it; function-level imports count too. The programs (each package's
``__main__.py``) stand above every package and may import any of them, but
never another program. Nothing in refimpl/ imports data_tools/, tests/ or
benchmarks/.
"""
import ast
import re
from pathlib import Path

import pytest

import refimpl

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "refimpl"
# Lowest first; the modules of the first layer are the package's top-level helpers.
LAYERS = [("checks", "backend", "threads", "fileio", "rundir", "sysinfo", "params", "deps"),
          ("data",), ("layers",), ("models",), ("parallel",), ("method",), ("optim",),
          ("checkpoint",), ("evaluate",),
          ("train",), ("oracle",)]
PROGRAMS = len(LAYERS)  # the layer of the __main__ modules
# What refimpl may never import: the three trees, and the modules of tests/ and
# benchmarks/, which their scripts import by bare name (``from tolerances import ...``).
OUTSIDE = {"data_tools", "tests", "benchmarks"} | {
    p.stem for folder in ("tests", "benchmarks") for p in (ROOT / folder).glob("*.py")}


def modules():
    """(dotted name, path) of every module of refimpl."""
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield ".".join(parts), path


def layer_of(name):
    """The layer of a dotted refimpl module name (the package root: the lowest)."""
    parts = name.split(".")
    if parts[-1] == "__main__":
        return PROGRAMS
    if len(parts) == 1:
        return 0
    for i, members in enumerate(LAYERS):
        if parts[1] in members:
            return i
    raise AssertionError(f"{name}: not in any layer of tests/test_layout.py's LAYERS "
                         f"(add its package to LAYERS and to refimpl/__init__.py)")


def imports(name, path, source):
    """(line, the import statement, dotted module it names) for every import in source."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, f"import {a.name}", a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package upwards
                up = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            text = f"from {'.' * node.level}{node.module or ''} import " \
                   + ", ".join(a.name for a in node.names)
            if base == "refimpl":  # from refimpl import checkpoint, __version__
                found += [(node.lineno, text, f"refimpl.{a.name}" if (PACKAGE / a.name).exists()
                           or (PACKAGE / f"{a.name}.py").exists() else "refimpl")
                          for a in node.names]
            else:
                found.append((node.lineno, text, base))
    return found


def violations(name, path, source):
    """Every import of module ``name`` that breaks the layering, as one line each."""
    mine = layer_of(name)
    bad = []
    for line, text, target in imports(name, path, source):
        where = f"{path.relative_to(ROOT)}:{line}: `{text}`"
        top = target.split(".")[0]
        if top in OUTSIDE:
            bad.append(f"{where} imports {top}, outside the library")
        if top != "refimpl":
            continue
        theirs = layer_of(target)
        if theirs == PROGRAMS and target != name:
            bad.append(f"{where}: {name} imports the program {target}")
        elif theirs > mine:
            bad.append(f"{where}: {name} (layer {mine}) imports {target} (layer {theirs}), "
                       f"a package above its own")
    return bad


def test_no_module_imports_a_package_above_its_own():
    bad = [v for name, path in modules() for v in violations(name, path, path.read_text())]
    assert not bad, "imports against the layer order of refimpl/__init__.py:\n" + "\n".join(bad)


def test_the_check_finds_what_it_forbids():
    """Negative controls: a layer importing a higher one inside a function, a library
    module importing a program, and a test helper are each reported."""
    path = PACKAGE / "layers" / "made_up.py"
    source = ("import numpy as np\nfrom refimpl.backend import to_numpy\n"
              "def f():\n    from refimpl.train.step import update\n"
              "    from refimpl.train.__main__ import main\n    import tolerances\n")
    bad = violations("refimpl.layers.made_up", path, source)
    assert len(bad) == 3, bad
    assert "refimpl/layers/made_up.py:4: `from refimpl.train.step import update`" in bad[0]
    assert "imports the program refimpl.train.__main__" in bad[1]
    assert "outside the library" in bad[2]
    assert violations("refimpl.oracle.made_up", PACKAGE / "oracle" / "made_up.py",
                      "from refimpl import checkpoint, __version__\n") == []
    assert len(violations("refimpl.data.made_up", PACKAGE / "data" / "made_up.py",
                          "from refimpl import checkpoint\n")) == 1


def test_the_docstring_lists_the_layers_in_this_order():
    """refimpl/__init__.py's table of packages is LAYERS, in order."""
    listed = []
    for line in refimpl.__doc__.splitlines():
        m = re.match(r"    (\S.*?)(?:\s{2,}|$)", line)
        if m:
            listed += [n.strip().rstrip("/") for n in m.group(1).split(",") if n.strip()]
    assert listed == [n for members in LAYERS for n in members]


@pytest.mark.parametrize("folder", ["data_tools", "tests", "benchmarks"])
def test_the_outside_trees_are_known(folder):
    assert (ROOT / folder).is_dir() and folder in OUTSIDE
