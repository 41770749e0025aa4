"""The house's layers: every import of detector/ and proposals/ (function-level ones included, read with
``ast``) goes down the layer table below, never up, never in a cycle, never to a private name of another
module; a function-local project import says why on its line or the line above. Also: the light paths
(evaluation, data, base, ``tools/detect.py --help``) never import torch, and the one atomic write gives
files the umask's permissions."""

from __future__ import annotations

import ast
import os
import stat
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from detector.base.files import atomic_open, atomic_path, atomic_write

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("detector", "proposals")

# Bottom up; a module may import its own layer and those below it. The first matching prefix wins.
LAYERS = [
    ("base", ("detector.base",)),
    ("data", ("detector.data",)),
    ("evaluation", ("detector.evaluation",)),
    ("proposals", ("proposals",)),
    ("training", ("detector.training",)),
    ("apps", ("detector.apps",)),  # the tools: argument parsing over everything below
    ("stages", ("detector",)),  # detector/*.py: warp, classifier, pipeline, ...
]
ORDER = ["base", "data", "evaluation", "proposals", "stages", "training", "apps"]
FACES = ("detector", "proposals")  # package faces: PEP 562 lazy names only, no imports of their own layer


def layer_of(module: str) -> str:
    for name, prefixes in LAYERS:
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return name
    raise AssertionError(f"{module}: in no layer; add it to LAYERS")


def project_modules() -> dict[str, Path]:
    mods = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            mods[name.removesuffix(".__init__")] = path
    return mods


MODULES = project_modules()


def _resolve(module: str, node: ast.ImportFrom | ast.Import) -> list[tuple[str, str | None]]:
    if isinstance(node, ast.Import):
        return [(a.name, None) for a in node.names]
    base = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
    if node.level:
        parts = base.split(".")
        base = ".".join(parts[: len(parts) - node.level + 1])
        target = f"{base}.{node.module}" if node.module else base
    else:
        target = node.module or ""
    return [(target, a.name) for a in node.names]


def imports() -> list[dict]:
    """Every project import: module, target module, imported name, line, in a function, reason comment."""
    found = []
    for module, path in MODULES.items():
        source = path.read_text(encoding="utf-8")
        lines = source.splitlines()
        tree = ast.parse(source)
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            first = _first_of_block(node, parents)
            parent, in_function = parents.get(node), False
            while parent is not None:
                if isinstance(parent, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    in_function = True
                    break
                parent = parents.get(parent)
            for target, name in _resolve(module, node):
                if target.split(".")[0] not in PACKAGES:
                    continue
                resolved = f"{target}.{name}" if name and f"{target}.{name}" in MODULES else target
                while resolved not in MODULES and "." in resolved:
                    resolved = resolved.rpartition(".")[0]
                if resolved == module:
                    continue
                found.append({"module": module, "target": resolved, "name": name, "line": node.lineno,
                              "in_function": in_function,
                              "reason": _commented(node, lines) or _commented(first, lines)})
    return found


def _first_of_block(node: ast.stmt, parents: dict) -> ast.stmt:
    """The first of the run of import statements ``node`` belongs to (statements one after the other in
    the same body): one comment above a function's block of imports gives the reason for all of them."""
    body = next((getattr(parents.get(node), f) for f in ("body", "orelse", "finalbody")
                 if node in getattr(parents.get(node), f, ())), [node])
    i = body.index(node)
    while i > 0 and isinstance(body[i - 1], (ast.Import, ast.ImportFrom)):
        i -= 1
    return body[i]


def _commented(node: ast.stmt, lines: list[str]) -> bool:
    """A comment on the statement's first line or on the line above it."""
    here, above = lines[node.lineno - 1], lines[node.lineno - 2] if node.lineno > 1 else ""
    return "#" in here or above.strip().startswith("#")


IMPORTS = imports()


def test_every_module_is_in_a_layer():
    for module in MODULES:
        layer_of(module)


def test_no_import_goes_up_a_layer():
    wrong = [f"{i['module']}:{i['line']} ({layer_of(i['module'])}) imports {i['target']} ({layer_of(i['target'])})"
             for i in IMPORTS if i["module"] not in FACES
             and ORDER.index(layer_of(i["target"])) > ORDER.index(layer_of(i["module"]))]
    assert not wrong, "imports that go up the layers:\n" + "\n".join(wrong)


def test_package_faces_import_nothing_but_the_lazy_loader():
    # detector/__init__.py and proposals/__init__.py load their public names lazily (detector.base.lazy,
    # which imports nothing of the project), so that importing detector.base.boxes or detector.evaluation
    # does not pull in torch
    eager = [f"{i['module']}:{i['line']} imports {i['target']}" for i in IMPORTS
             if i["module"] in FACES and i["target"] != "detector.base.lazy"]
    assert not eager, "\n".join(eager)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in list(graph):
        if v not in index:
            visit(v)
    return out


def test_no_module_cycles():
    graph = defaultdict(set)
    for i in IMPORTS:
        graph[i["module"]].add(i["target"])
    assert not _cycles(graph), f"import cycles: {_cycles(graph)}"


def test_no_private_names_cross_modules():
    private = [f"{i['module']}:{i['line']} imports {i['target']}.{i['name']}" for i in IMPORTS
               if i["name"] and i["name"].startswith("_") and not i["name"].startswith("__")]
    assert not private, "\n".join(private)


def test_function_local_project_imports_give_a_reason():
    # the apps too: they import what brings in torch or numba inside a function, after parsing, so that
    # --help and a bad flag answer at once; everything lighter is imported at the top
    silent = [f"{i['module']}:{i['line']} imports {i['target']}" for i in IMPORTS
              if i["in_function"] and not i["reason"]]
    assert not silent, ("function-local project imports without a comment saying why (an optional heavy "
                        "dependency), or move them to the top of the module:\n" + "\n".join(silent))


def _modules_after(code: str) -> set[str]:
    """The modules a fresh interpreter holds after running ``code`` (printed after a marker line)."""
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys\nprint('@@modules', *sys.modules)"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120, check=True)
    return set(out.stdout.rpartition("@@modules")[2].split())


def test_light_layers_never_import_torch():
    loaded = _modules_after("import detector.evaluation, detector.data, detector.base.boxes, detector.base.io, "
                            "detector.base.checkpoint, detector.base.files, detector.base.defaults\n"
                            "from detector import load_image, UserError\n"
                            "from proposals import ProposalStore")
    assert "torch" not in loaded and "torchvision" not in loaded


def test_public_names_still_load():
    loaded = _modules_after("from detector import load_detector, Detector, Detections\n"
                            "from proposals import propose, selective_search\n"
                            "assert callable(propose) and callable(selective_search)")
    assert "torch" in loaded


def test_detect_help_does_not_import_torch():
    code = ("import runpy, sys\nsys.argv = ['detect.py', '--help']\n"
            "try:\n    runpy.run_path('tools/detect.py', run_name='__main__')\nexcept SystemExit:\n    pass")
    loaded = _modules_after(code)
    assert "argparse" in loaded and "torch" not in loaded


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_write_gives_the_umask_permissions(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        written = [atomic_write(tmp_path / "a.txt", "text"), tmp_path / "b.json", tmp_path / "c.bin"]
        with atomic_open(written[1]) as f:
            f.write("{}")
        with atomic_path(written[2]) as tmp:
            tmp.write_bytes(b"\0")
        written.append(tmp_path / "d.bin")  # a writer that makes its own file in place of ours, mode 0600
        with atomic_path(written[3]) as tmp:
            tmp.unlink()
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT, 0o600))
        plain = tmp_path / "plain.txt"
        plain.write_text("a file created the ordinary way")
    finally:
        os.umask(old)
    assert stat.S_IMODE(plain.stat().st_mode) == mode  # what any file gets
    for path in written:
        assert stat.S_IMODE(path.stat().st_mode) == mode, path


def test_atomic_write_leaves_the_old_file_on_error(tmp_path):
    target = atomic_write(tmp_path / "sub" / "x.txt", "old")
    with pytest.raises(RuntimeError), atomic_open(target) as f:
        f.write("half of a new")
        raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert [p.name for p in target.parent.iterdir()] == ["x.txt"]  # no temporary file left behind
