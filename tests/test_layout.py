"""The folders of src/pymach follow a stated layering, with no cycles (README "Layout").

Every module under src/pymach is parsed (not imported). Each import of a pymach module is
an edge from the importing module's unit to the imported module's unit, whether it sits at
module top or inside a function: a function-local import is a dependency all the same,
only a later one. Imports in the body of an `if TYPE_CHECKING:` block are skipped: they
never run and only name types for annotations. Dynamic imports (importlib, __import__)
are refused outright, so no dependency can hide from this scan.

A unit is a folder (`kern`, `vm`, ...), `errors` (errors.py), `libmach-api` (mach.py and
mach_vm.py, the user library) or `pymach` (the package's __init__.py). LAYERS gives each
its layer; an import may go to the same layer or below, never up. Mutual imports are
allowed only inside the core group (ipc, kern, vm: Mach's own mutual dependencies), and
only along the edges stated in CORE_EDGES. A function-local import that remains inside the
core is stated in CORE_LOCAL_IMPORTS: a top-level one would be a cycle at import time, or
it defers loading the kernel's server and VM system from `import pymach` to the first
Kernel (checked in a fresh interpreter).
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "pymach"

# Bottom to top; mirrors the README's "Layout" section.
LAYERS: dict[str, int] = {
    "errors": 1,  # MachError and the error codes
    "include": 1,  # Mach types, constants, message format, wire, interface definitions
    "pmap": 2,  # the machine-dependent layer
    "ipc": 3,  # core
    "kern": 3,  # core
    "vm": 3,  # core
    "libmach-api": 4,  # the user library: mach.py, mach_vm.py
    "pagers": 5,  # data managers, the default pager
    "net": 5,  # the network message server, name service, transports
    "libmach": 6,  # what runs inside a native task's process
    "machd": 6,  # the native daemon
    "apps": 6,  # the paper's section 8 applications, libraries built on the user library
    "cli": 7,
    "bench": 7,
    "pymach": 7,  # pymach/__init__.py: the public API, and the composition root
    "__main__": 7,  # pymach/__main__.py: `python -m pymach`, the command line (cli/)
}
CORE = frozenset({"ipc", "kern", "vm"})
USER_LIBRARY = frozenset({"mach", "mach_vm"})  # top-level modules of the unit libmach-api

# Mach's own mutual dependencies: the only edges between core units.
CORE_EDGES: dict[tuple[str, str], str] = {
    ("ipc", "kern"): "ports, spaces and message queues block threads on the scheduler's "
                     "wait queues (kern/sched_prim)",
    ("ipc", "vm"): "out-of-line memory travels in messages as copies in transit "
                   "(vm/vm_map_copy)",
    ("kern", "ipc"): "tasks and threads own name spaces and ports; traps and the kernel "
                     "server send and receive kernel messages",
    ("kern", "vm"): "tasks have address maps; the host boots the VM system; the kernel "
                    "server dispatches the VM and pager interfaces (vm_user, memory_object)",
    ("vm", "ipc"): "the kernel speaks the memory-object protocol to data managers in "
                   "messages (vm/memory_object)",
    ("vm", "kern"): "faults, pageout and the pager protocol block on the scheduler and "
                    "act for the current thread",
}

# Function-local imports that remain inside the core, (importing module, imported module)
# -> why: either a top-level import would be a cycle at import time, or the import is
# deferred so that `import pymach`, which every native task's process runs, does not load
# the kernel's server and VM system: they load when a Kernel is made.
_DEFERRED = "deferred until a Kernel is made (not loaded by `import pymach`)"
CORE_LOCAL_IMPORTS: dict[tuple[str, str], str] = {
    ("pymach.kern.sched_prim", "pymach.kern.sched_det"):
        "make_scheduler chooses the backend; each backend builds on sched_prim",
    ("pymach.kern.sched_prim", "pymach.kern.sched_free"):
        "make_scheduler chooses the backend; each backend builds on sched_prim",
    ("pymach.vm.vm_fault", "pymach.vm.memory_object"):
        "cycle: memory_object imports vm_fault at top (it completes faults for managers)",
    ("pymach.vm.vm_object", "pymach.vm.memory_object"):
        "cycle: memory_object imports vm_object at top (objects are what managers back)",
    ("pymach.vm.vm_pageout", "pymach.vm.memory_object"):
        "cycle: memory_object imports vm_pageout at top (flushes write pages back)",
    ("pymach.kern.host", "pymach.kern.ipc_kobject"): _DEFERRED + ": the kernel server",
    ("pymach.kern.host", "pymach.vm.vm_init"): _DEFERRED + ": the VM system",
    ("pymach.kern.host", "pymach.vm.vm_pageout"): _DEFERRED + ": the pageout daemon",
    ("pymach.kern.host", "pymach.kern.report"): _DEFERRED + ": reports",
    ("pymach.kern.host", "pymach.vm.vm_report"): _DEFERRED + ": reports",
    ("pymach.kern.host", "pymach.pmap"): _DEFERRED + ": the machine layer",
    ("pymach.kern.task", "pymach.vm.vm_map_copy"): _DEFERRED + ": inheriting a map",
    ("pymach.ipc.kmsg", "pymach.vm.vm_map_copy"): _DEFERRED + ": out-of-line memory",
    ("pymach.ipc.ipc_right", "pymach.vm.vm_map_copy"): _DEFERRED + ": out-of-line memory",
}

# Edges the layers would allow but the design does not.
FORBIDDEN: dict[tuple[str, str], str] = {
    ("machd", "libmach"): "the daemon never imports the task-side library",
    ("libmach", "machd"): "a task's process never imports the daemon",
    ("pagers", "net"): "data managers and the network are separate servers over the user "
                       "library; the interfaces they share are in include/",
    ("net", "pagers"): "as above",
}

# (d) The bottom layer imports nothing of pymach above it.
BOTTOM_MAY_IMPORT: dict[str, frozenset[str]] = {
    "include": frozenset({"errors"}),
    "errors": frozenset(),
}


@dataclass(frozen=True)
class Import:
    """One import of a pymach module, where it is in the source."""

    module: str  # the importing module, as pymach.kern.host
    target: str  # the imported module, as pymach.vm.vm_init
    path: str  # the importing file, relative to src/
    line: int
    local: bool  # inside a function

    def __str__(self) -> str:
        where = "function-local " if self.local else ""
        return f"{self.path}:{self.line}: {where}import of {self.target}"


# -- the scanner -------------------------------------------------------------------------

def module_name(path: Path, src: Path = SRC) -> str:
    """pymach.kern.host for src/pymach/kern/host.py, pymach.kern for its __init__.py."""
    parts = list(path.relative_to(src.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def unit_of(module: str) -> str:
    """The unit a module belongs to (see module docstring)."""
    parts = module.split(".")
    if len(parts) == 1:
        return "pymach"
    return "libmach-api" if parts[1] in USER_LIBRARY else parts[1]


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool,
             modules: set[str]) -> list[str]:
    """The pymach modules an import statement imports."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "pymach"]
    base = node.module or ""
    if node.level:  # relative: from the importing module's package
        package = module.split(".")
        if not is_package:
            package.pop()
        package = package[:len(package) - node.level + 1]
        base = ".".join(package + ([base] if base else []))
    if base.split(".")[0] != "pymach":
        return []
    # `from pymach.kern import mig` imports the module pymach.kern.mig; `from pymach import
    # Message` imports a name of the package pymach.
    return sorted({f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                   for a in node.names})


def scan_source(text: str, module: str, path: str, modules: set[str],
                is_package: bool = False) -> tuple[list[Import], list[str]]:
    """The pymach imports of one module's source, and its dynamic imports (as sites)."""
    imports: list[Import] = []
    dynamic: list[str] = []

    def visit(node: ast.AST, local: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                for stmt in child.orelse:  # only the body is for type checkers
                    visit_one(stmt, local)
                continue
            visit_one(child, local)

    def visit_one(node: ast.AST, local: bool) -> None:
        if isinstance(node, ast.Import | ast.ImportFrom):
            for target in _targets(node, module, is_package, modules):
                imports.append(Import(module, target, path, node.lineno, local))
        elif isinstance(node, ast.Call):
            f = node.func
            name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(
                f, ast.Attribute) else ""
            if name in ("import_module", "__import__"):
                dynamic.append(f"{path}:{node.lineno}")
        visit(node, local or isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef
                                        | ast.Lambda))

    visit(ast.parse(text), False)
    return imports, dynamic


def scan(src: Path = SRC) -> tuple[list[Import], list[str]]:
    """Every pymach import under `src`, and every dynamic import."""
    files = sorted(src.rglob("*.py"))
    modules = {module_name(f, src) for f in files}
    imports: list[Import] = []
    dynamic: list[str] = []
    for f in files:
        found, dyn = scan_source(f.read_text(), module_name(f, src),
                                 str(f.relative_to(src.parent)), modules,
                                 f.name == "__init__.py")
        imports += found
        dynamic += dyn
    return imports, dynamic


Edges = Mapping[tuple[str, str], list[Import]]


def unit_edges(imports: Iterable[Import]) -> dict[tuple[str, str], list[Import]]:
    """(importing unit, imported unit) -> the imports that make the edge (no self-edges)."""
    edges: dict[tuple[str, str], list[Import]] = defaultdict(list)
    for imp in imports:
        a, b = unit_of(imp.module), unit_of(imp.target)
        if a != b:
            edges[(a, b)].append(imp)
    return dict(edges)


# -- the checks (each returns its violations; empty when the layering holds) -------------

def _sites(imps: list[Import]) -> str:
    return "; ".join(str(i) for i in imps[:3]) + (" ..." if len(imps) > 3 else "")


def unplaced_units(edges: Edges, layers: Mapping[str, int] = LAYERS) -> list[str]:
    """Units that have no layer (a new folder must be placed in LAYERS and the README)."""
    units = {u for edge in edges for u in edge}
    return sorted(u for u in units if u not in layers)


def upward_edges(edges: Edges, layers: Mapping[str, int] = LAYERS,
                 core: frozenset[str] = CORE,
                 core_edges: Mapping[tuple[str, str], str] = CORE_EDGES) -> list[str]:
    """(a) Edges to a higher layer, and edges inside the core that are not stated."""
    out = []
    for (a, b), imps in sorted(edges.items()):
        if a not in layers or b not in layers:
            continue
        if layers[b] > layers[a]:
            out.append(f"{a} (layer {layers[a]}) imports {b} (layer {layers[b]}): "
                       f"{_sites(imps)}")
        elif a in core and b in core and (a, b) not in core_edges:
            out.append(f"core edge {a} -> {b} is not stated in CORE_EDGES: {_sites(imps)}")
    return out


def cycles(edges: Edges, core: frozenset[str] = CORE) -> list[list[str]]:
    """(b) Cycles between units, the core group counting as one unit ("core")."""
    graph: dict[str, set[str]] = defaultdict(set)
    for a, b in edges:
        a, b = ("core" if a in core else a), ("core" if b in core else b)
        if a != b:
            graph[a].add(b)
            graph.setdefault(b, set())
    # Tarjan's strongly connected components.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def strongconnect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strongconnect(w)
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return found


def forbidden_edges(edges: Edges,
                    forbidden: Mapping[tuple[str, str], str] = FORBIDDEN) -> list[str]:
    """(c) Edges the design rules out (machd and libmach never import each other)."""
    return [f"{a} imports {b} ({forbidden[(a, b)]}): {_sites(imps)}"
            for (a, b), imps in sorted(edges.items()) if (a, b) in forbidden]


def bottom_edges(edges: Edges,
                 bottom: Mapping[str, frozenset[str]] = BOTTOM_MAY_IMPORT) -> list[str]:
    """(d) include/ imports nothing of pymach but errors; errors.py nothing at all."""
    return [f"{a} imports {b}: {_sites(imps)}" for (a, b), imps in sorted(edges.items())
            if a in bottom and b not in bottom[a]]


def unstated_core_local_imports(
        imports: Iterable[Import], core: frozenset[str] = CORE,
        stated: Mapping[tuple[str, str], str] = CORE_LOCAL_IMPORTS) -> list[str]:
    """Function-local imports from a core module that CORE_LOCAL_IMPORTS does not state,
    and stated ones that are gone (the list stays true)."""
    seen: dict[tuple[str, str], Import] = {}
    for imp in imports:
        if imp.local and unit_of(imp.module) in core and imp.module != imp.target:
            seen.setdefault((imp.module, imp.target), imp)
    out = [f"not stated in CORE_LOCAL_IMPORTS: {imp}"
           for key, imp in sorted(seen.items()) if key not in stated]
    out += [f"stated in CORE_LOCAL_IMPORTS but no longer there (remove it): {a} -> {b}"
            for a, b in sorted(stated) if (a, b) not in seen]
    return out


# -- the tree ----------------------------------------------------------------------------

IMPORTS, DYNAMIC = scan()
EDGES = unit_edges(IMPORTS)


def test_the_scan_sees_the_tree() -> None:
    assert len(IMPORTS) > 300
    assert {"include", "kern", "vm", "ipc", "libmach-api", "machd", "pymach"} <= {
        u for edge in EDGES for u in edge}


def test_every_unit_has_a_layer() -> None:
    assert unplaced_units(EDGES) == []
    folders = {p.name for p in SRC.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    modules = {p.stem for p in SRC.glob("*.py")} - {"__init__"}
    assert folders | (modules - USER_LIBRARY) | {"libmach-api", "pymach"} == set(LAYERS)


def test_no_dynamic_imports() -> None:
    assert DYNAMIC == []


def test_imports_go_down_the_layers() -> None:
    assert upward_edges(EDGES) == []


def test_core_edges_are_the_stated_ones() -> None:
    core = {(a, b) for a, b in EDGES if a in CORE and b in CORE}
    assert core == set(CORE_EDGES)


def test_no_cycles_outside_the_core() -> None:
    assert cycles(EDGES) == []


def test_machd_and_libmach_never_import_each_other() -> None:
    assert forbidden_edges(EDGES) == []


def test_include_imports_nothing_of_pymach_but_errors() -> None:
    assert bottom_edges(EDGES) == []


def test_function_local_imports_in_the_core_are_stated() -> None:
    assert unstated_core_local_imports(IMPORTS) == []


def test_deferred_imports_are_not_loaded_by_import_pymach() -> None:
    deferred = sorted({b for (_, b), why in CORE_LOCAL_IMPORTS.items()
                       if why.startswith(_DEFERRED)})
    r = subprocess.run([sys.executable, "-c", "import sys, pymach; print(*sorted(sys.modules))"],
                       capture_output=True, text=True, check=True,
                       env={**os.environ, "PYTHONPATH": str(SRC.parent)})
    assert set(deferred) & set(r.stdout.split()) == set()


# -- the checks catch violations ---------------------------------------------------------

FAKE_MODULES = {"pymach", "pymach.mach", "pymach.errors", "pymach.kern", "pymach.kern.mig",
                "pymach.kern.host", "pymach.vm", "pymach.vm.vm_map", "pymach.include",
                "pymach.include.message", "pymach.pagers", "pymach.pagers.shm",
                "pymach.net", "pymach.net.netname", "pymach.machd", "pymach.machd.machd",
                "pymach.libmach", "pymach.libmach.task"}

FAKE_TREE = {
    # an upward edge, from a function (the kind of import that hid cycles)
    "pymach.kern.mig": "def stub():\n    from pymach import mach\n",
    # a top-level edge back down: with the one above, a cycle core <-> libmach-api
    "pymach.mach": "from pymach.kern.mig import Subsystem\n",
    # a mutual pair outside the core, at one layer
    "pymach.pagers.shm": "from pymach.net.netname import netname_check_in\n",
    "pymach.net.netname": "from pymach.pagers import shm\n",
    # the daemon importing the task-side library
    "pymach.machd.machd": "from pymach.libmach.task import attach\n",
    # include importing the core, relative and guarded (the guard's else branch runs)
    "pymach.include.message": "if TYPE_CHECKING:\n    from pymach.vm.vm_map import VmMap\n"
                              "else:\n    from ..kern import host\n",
    # a name of the package, not a module: the package itself
    "pymach.vm.vm_map": "from pymach import Message\nimport importlib\n"
                        "importlib.import_module('pymach.machd')\n",
}


def _fake_scan() -> tuple[list[Import], list[str]]:
    imports: list[Import] = []
    dynamic: list[str] = []
    for module, text in FAKE_TREE.items():
        found, dyn = scan_source(text, module, module.replace(".", "/") + ".py",
                                 FAKE_MODULES)
        imports += found
        dynamic += dyn
    return imports, dynamic


def test_the_scanner_resolves_imports() -> None:
    imports, dynamic = _fake_scan()
    got = {(i.module, i.target, i.local) for i in imports}
    assert ("pymach.kern.mig", "pymach.mach", True) in got
    assert ("pymach.net.netname", "pymach.pagers.shm", False) in got
    assert ("pymach.include.message", "pymach.kern.host", False) in got  # relative, else
    assert not any(t == "pymach.vm.vm_map" for _, t, _ in got)  # TYPE_CHECKING skipped
    assert ("pymach.vm.vm_map", "pymach", False) in got
    assert dynamic == ["pymach/vm/vm_map.py:3"]


def test_the_checks_catch_violations() -> None:
    imports, _ = _fake_scan()
    edges = unit_edges(imports)
    up = upward_edges(edges)
    assert any(v.startswith("kern (layer 3) imports libmach-api (layer 4)") and
               "function-local" in v for v in up)
    assert any(v.startswith("vm (layer 3) imports pymach (layer 7)") for v in up)
    assert any(v.startswith("include (layer 1) imports kern") for v in up)
    assert ["core", "libmach-api"] in cycles(edges)
    assert ["net", "pagers"] in cycles(edges)
    assert any(v.startswith("machd imports libmach") for v in forbidden_edges(edges))
    assert any(v.startswith("pagers imports net") for v in forbidden_edges(edges))
    assert [v.split(":")[0] for v in bottom_edges(edges)] == ["include imports kern"]
    assert unplaced_units({("kern", "newfolder"): []}) == ["newfolder"]
    # an unstated core edge, and an unstated function-local import in the core
    kern_vm = {("kern", "vm"): [Import("pymach.kern.host", "pymach.vm.vm_map", "x", 1, True)]}
    assert upward_edges(kern_vm, core_edges={}) == [
        "core edge kern -> vm is not stated in CORE_EDGES: x:1: function-local import of "
        "pymach.vm.vm_map"]
    assert unstated_core_local_imports(kern_vm[("kern", "vm")], stated={}) == [
        "not stated in CORE_LOCAL_IMPORTS: x:1: function-local import of pymach.vm.vm_map"]
    assert unstated_core_local_imports([], stated={("pymach.vm.a", "pymach.vm.b"): ""}) == [
        "stated in CORE_LOCAL_IMPORTS but no longer there (remove it): pymach.vm.a -> "
        "pymach.vm.b"]
