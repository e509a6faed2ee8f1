"""The import contract: each job lives in one module, and imports only go down the layers.

Layers, bottom to top (the same table is in docs/DESIGN.md, section "Layers"):

    leaf -> modules -> stages -> pipeline -> api -> cli

A module may import modules of its own layer or of a lower one, never of a higher one, and no
import may close a cycle. Every import of ours counts: module level, inside functions, under
``if TYPE_CHECKING:``, relative, and ``importlib.import_module("...")`` with a string literal.
``rich`` and ``typer`` are for the CLI only; the library reports progress through callbacks.

``check_contract`` and ``check_scripts`` are plain functions over ``ast`` (nothing is imported),
proved on small fake packages below and then run on the real tree.
"""

from __future__ import annotations

import ast
import re
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Optional

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "vitcompress"
PACKAGE_ROOT = REPO / "src" / PACKAGE
DESIGN_DOC = REPO / "docs" / "DESIGN.md"
SCRIPT_DIRS = ("benchmarks", "examples")

LAYER_ORDER = ("leaf", "modules", "stages", "pipeline", "api", "cli")  # bottom to top
PACKAGE_ITSELF = "__init__"  # the table's name for the package's own __init__.py
CLI = "cli"  # the subpackage that alone may import rich and typer
CLI_ONLY_LIBRARIES = ("rich", "typer")

# Module names relative to the package; "x.*" stands for every module below package x.
LAYERS: dict[str, str] = {
    # leaf: import nothing of ours except other leaves
    "errors": "leaf",
    "_io": "leaf",
    "_lock": "leaf",  # one writer per folder: a pid lock file
    "names": "leaf",  # every output file name
    "timing": "leaf",  # the one interleaved timer and its statistics
    "timing_cache": "leaf",  # timings a machine measured, reused by the next plan
    "geometry": "leaf",  # supported-ViT check, token grid, prefix count, input size
    "plan_types": "leaf",  # Plan / Reduction / Budget, save_plan / load_plan, parse_budget
    "hub": "leaf",
    "_version": "leaf",
    # modules: pure tensor code (new nn.Modules, token merging)
    "modules": "modules",
    "modules.dgssa": "modules",
    "modules.glad": "modules",
    "modules.tome": "modules",
    # stages
    "models": "stages",
    "data": "stages",
    "analyze": "stages",
    "flops": "stages",
    "cost": "stages",
    "convert": "stages",
    "plan": "stages",
    "probe": "stages",  # short fine-tunes of a plan shortlist
    "damage": "stages",
    "finetune": "stages",
    "distributed": "stages",
    "export": "stages",
    "bench": "stages",
    # the whole flow
    "pipeline": "pipeline",
    # re-exports
    PACKAGE_ITSELF: "api",
    "__main__": "api",
    # the command line
    "cli": "cli",
    "cli.*": "cli",
}
# Upward imports allowed by name: `python -m vitcompress` runs the CLI.
ALLOWED_UPWARD = frozenset({("__main__", "cli")})


# ----------------------------------------------------------------------------- reading imports


@dataclass(frozen=True)
class ImportStatement:
    """One imported thing: ``module`` is absolute (relative imports resolved); ``name`` is set for
    ``from module import name`` (it may itself be a submodule)."""

    module: str
    name: Optional[str]
    line: int

    @property
    def written(self) -> str:
        return f"{self.module}.{self.name}" if self.name else self.module


def absolute_module(module: Optional[str], level: int, importer: str, is_package: bool) -> Optional[str]:
    """The absolute name of ``from <level dots><module> import ...`` inside ``importer``
    (None when it reaches above the top-level package)."""
    if level == 0:
        return module
    anchor = importer.split(".") if importer else []
    if not is_package:
        anchor = anchor[:-1]
    if level - 1 >= len(anchor):
        return None
    anchor = anchor[: len(anchor) - (level - 1)]
    return ".".join(anchor + ([module] if module else []))


def _string(node: Optional[ast.expr]) -> Optional[str]:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def import_module_literal(call: ast.Call) -> Optional[str]:
    """The module named by ``importlib.import_module("x")`` / ``__import__("x")`` with string
    literals (a relative name needs a literal ``package``); None for any other call."""
    func = call.func
    func_name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
    if func_name not in ("import_module", "__import__") or not call.args:
        return None
    name = _string(call.args[0])
    if name is None or not name.startswith("."):
        return name
    if func_name == "__import__":
        return None  # a relative __import__ needs level=, not seen in practice
    package_arg = call.args[1] if len(call.args) > 1 else None
    package_arg = next((k.value for k in call.keywords if k.arg == "package"), package_arg)
    anchor = _string(package_arg)
    if anchor is None:
        return None
    level = len(name) - len(name.lstrip("."))
    return absolute_module(name.lstrip(".") or None, level, anchor, is_package=True)


def imports_in(tree: ast.AST, importer: str, is_package: bool) -> list[ImportStatement]:
    """Every import anywhere in ``tree`` (functions and ``if TYPE_CHECKING:`` blocks included)."""
    found: list[ImportStatement] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [ImportStatement(alias.name, None, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = absolute_module(node.module, node.level, importer, is_package)
            if module is not None:
                found += [ImportStatement(module, alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.Call) and (literal := import_module_literal(node)):
            found.append(ImportStatement(literal, None, node.lineno))
    return sorted(found, key=lambda statement: statement.line)


def find_modules(package_root: Path, package: str) -> dict[str, Path]:
    """Absolute module name -> file, for every ``.py`` below ``package_root``."""
    modules: dict[str, Path] = {}
    for path in sorted(package_root.rglob("*.py")):
        parts = path.relative_to(package_root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join((package, *parts))] = path
    return modules


# ----------------------------------------------------------------------------- the graph


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    where: str  # "vitcompress/cost.py:98"

    def __str__(self) -> str:
        return f"{self.source} -> {self.target} ({self.where})"


def table_name(module: str, package: str) -> str:
    """The layer table's name for an absolute module name."""
    return PACKAGE_ITSELF if module == package else module[len(package) + 1 :]


def layer_of(name: str, layers: Mapping[str, str]) -> Optional[str]:
    """The layer of a table name: listed itself, or below a ``package.*`` entry."""
    if name in layers:
        return layers[name]
    parts = name.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        pattern = ".".join(parts[:cut]) + ".*"
        if pattern in layers:
            return layers[pattern]
    return None


def is_ours(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def target_module(statement: ImportStatement, modules: Mapping[str, Path]) -> Optional[str]:
    """The module an import of ours loads: ``from a import b`` is ``a.b`` when that is a module,
    else ``a``; None when no such module exists."""
    if statement.name and statement.written in modules:
        return statement.written
    return statement.module if statement.module in modules else None


@dataclass
class PackageImports:
    package: str
    modules: dict[str, Path]
    statements: dict[str, list[ImportStatement]]  # importing module -> its imports
    display_root: Path

    def file_of(self, module: str) -> str:
        return self.modules[module].relative_to(self.display_root).as_posix()

    def where(self, module: str, line: int) -> str:
        return f"{self.file_of(module)}:{line}"

    def edges(self) -> list[Edge]:
        """Import edges between our modules (a module importing itself left out)."""
        edges = []
        for module, statements in self.statements.items():
            for statement in statements:
                target = target_module(statement, self.modules) if is_ours(statement.module, self.package) else None
                if target not in (None, module):
                    edges.append(Edge(module, target, self.where(module, statement.line)))
        return list(dict.fromkeys(edges))  # `from a import x, y` is one edge


def read_package(package_root: Path, package: str) -> PackageImports:
    modules = find_modules(package_root, package)
    statements = {
        module: imports_in(ast.parse(path.read_text(encoding="utf-8"), str(path)), module, path.name == "__init__.py")
        for module, path in modules.items()
    }
    return PackageImports(package, modules, statements, package_root.parent)


# ----------------------------------------------------------------------------- the checks


def unlisted_modules(imports: PackageImports, layers: Mapping[str, str]) -> list[str]:
    return [
        f"{module} ({imports.file_of(module)}) is in no layer: "
        "add it to the table in tests/test_layers.py and docs/DESIGN.md"
        for module in imports.modules
        if layer_of(table_name(module, imports.package), layers) is None
    ]


def missing_targets(imports: PackageImports) -> list[str]:
    offending = {
        f"{module} -> {s.module} ({imports.where(module, s.line)})": None
        for module, statements in imports.statements.items()
        for s in statements
        if is_ours(s.module, imports.package) and target_module(s, imports.modules) is None
    }
    return [f"{edge}: no such module in {imports.package}" for edge in offending]


def cli_only_imports(imports: PackageImports) -> list[str]:
    def in_cli(module: str) -> bool:
        name = table_name(module, imports.package)
        return name == CLI or name.startswith(CLI + ".")

    offending = {
        f"{module} -> {s.module} ({imports.where(module, s.line)})": None
        for module, statements in imports.statements.items()
        if not in_cli(module)
        for s in statements
        if s.module.split(".")[0] in CLI_ONLY_LIBRARIES
    }
    rule = f"{' and '.join(CLI_ONLY_LIBRARIES)} only inside {CLI}/ (report progress through a callback)"
    return [f"{edge}: {rule}" for edge in offending]


RANK = {layer: position for position, layer in enumerate(LAYER_ORDER)}


def edge_layers(edge: Edge, package: str, layers: Mapping[str, str]) -> tuple[Optional[str], Optional[str]]:
    return layer_of(table_name(edge.source, package), layers), layer_of(table_name(edge.target, package), layers)


def goes_up(edge: Edge, package: str, layers: Mapping[str, str], allowed: frozenset) -> bool:
    """Whether ``edge`` imports a higher layer (and is not one of the ``allowed`` pairs)."""
    source_layer, target_layer = edge_layers(edge, package, layers)
    if source_layer is None or target_layer is None:
        return False  # reported as missing from the table
    pair = (table_name(edge.source, package), table_name(edge.target, package))
    return RANK[target_layer] > RANK[source_layer] and pair not in allowed


def upward_imports(edges: Iterable[Edge], package: str, layers: Mapping[str, str], allowed: frozenset) -> list[str]:
    return [
        f"{edge}: {' may not import '.join(edge_layers(edge, package, layers))}"
        for edge in edges
        if goes_up(edge, package, layers, allowed)
    ]


def strongly_connected(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components of ``graph``."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for successor in sorted(graph.get(node, ())):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while not component or component[-1] != node:
                component.append(stack.pop())
            components.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def shortest_cycle(start: str, graph: Mapping[str, set[str]]) -> list[str]:
    """The shortest path start -> ... -> start (breadth first); ``start`` must be on a cycle."""
    came_from: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for successor in sorted(graph.get(node, ())):
            if successor == start:
                path = [node]
                while path[-1] != start:
                    path.append(came_from[path[-1]])
                return path[::-1] + [start]
            if successor not in came_from:
                came_from[successor] = node
                queue.append(successor)
    raise ValueError(f"{start} is on no cycle")


def import_cycles(edges: Iterable[Edge]) -> list[str]:
    graph: dict[str, set[str]] = {}
    places: dict[tuple[str, str], list[str]] = {}
    for edge in edges:
        graph.setdefault(edge.source, set()).add(edge.target)
        places.setdefault((edge.source, edge.target), []).append(edge.where)
    problems = []
    for component in strongly_connected(graph):
        if len(component) < 2:
            continue
        members = set(component)
        cycle = shortest_cycle(min(component), {node: graph[node] & members for node in members})
        steps = "; ".join(f"{a} -> {b} ({', '.join(places[a, b])})" for a, b in zip(cycle, cycle[1:]))
        group = f" [all in this cycle group: {', '.join(sorted(members))}]" if len(members) > len(cycle) - 1 else ""
        problems.append(f"import cycle {' -> '.join(cycle)}: {steps}{group}")
    return problems


def check_contract(
    package_root: Path, package: str, layers: Mapping[str, str], *, allowed_upward: frozenset = frozenset()
) -> list[str]:
    """Every violation of the import contract in the package at ``package_root`` (empty: clean).

    ``layers`` maps module names relative to ``package`` (``PACKAGE_ITSELF`` for its __init__,
    ``"x.*"`` for everything below x) to a layer of ``LAYER_ORDER``; ``allowed_upward`` holds
    (importer, imported) name pairs exempt from the layer order."""
    unknown = sorted(set(layers.values()) - set(LAYER_ORDER))
    if unknown:
        raise ValueError(f"unknown layers {unknown}; the layers are {LAYER_ORDER}")
    imports = read_package(package_root, package)
    edges = imports.edges()
    # A cycle across layers has an upward edge, reported as such; what is left are cycles
    # inside one layer (and through modules missing from the table).
    level_or_down = [edge for edge in edges if not goes_up(edge, package, layers, allowed_upward)]
    return [
        *unlisted_modules(imports, layers),
        *missing_targets(imports),
        *cli_only_imports(imports),
        *upward_imports(edges, package, layers, allowed_upward),
        *import_cycles(level_or_down),
    ]


def check_scripts(scripts: Iterable[Path], package: str, display_root: Path) -> list[str]:
    """Scripts (benchmarks, examples) that import the CLI instead of calling the library."""
    cli = f"{package}.{CLI}"

    def names_cli(module: str) -> bool:
        return module == cli or module.startswith(cli + ".")

    problems: dict[str, None] = {}  # one message per imported module and line
    for path in sorted(scripts):
        for s in imports_in(ast.parse(path.read_text(encoding="utf-8"), str(path)), "", is_package=False):
            if names_cli(s.written):
                where = f"{path.relative_to(display_root).as_posix()}:{s.line}"
                imported = s.module if names_cli(s.module) else s.written  # `from vitcompress import cli`
                problems[f"{where} imports {imported}: scripts call the library, not the CLI"] = None
    return list(problems)


def documented_layers(design_doc: str) -> dict[str, str]:
    """Module -> layer from the table under the "## Layers" heading of docs/DESIGN.md
    (first column the layer, second the modules in backticks)."""
    section = re.search(r"^## Layers\b.*?(?=^## |\Z)", design_doc, re.MULTILINE | re.DOTALL)
    table: dict[str, str] = {}
    for line in (section.group(0) if section else "").splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        layer = cells[0].strip("`* ")
        if len(cells) >= 2 and layer in LAYER_ORDER:
            table.update({name: layer for name in re.findall(r"`([^`]+)`", cells[1])})
    return table


# ----------------------------------------------------------------------------- proof on fake packages

FAKE = "fakepkg"
FAKE_LAYERS = {
    PACKAGE_ITSELF: "api",
    "__main__": "api",
    "errors": "leaf",
    "names": "leaf",
    "modules": "modules",
    "modules.merge": "modules",
    "stage_a": "stages",
    "stage_b": "stages",
    "pipeline": "pipeline",
    "cli": "cli",
    "cli.*": "cli",
}
CLEAN_FILES = {
    "__init__.py": "from fakepkg.stage_a import run\nfrom fakepkg.pipeline import go\n",
    "__main__.py": "from fakepkg.cli import main\n",
    "errors.py": "class Oops(Exception):\n    pass\n",
    "names.py": "from .errors import Oops\n",
    "modules/__init__.py": "from .merge import merge\n",
    "modules/merge.py": "from ..errors import Oops\n\ndef merge():\n    pass\n",
    "stage_a.py": (
        "from typing import TYPE_CHECKING\n"
        "import fakepkg.names\n"
        "from fakepkg.modules import merge\n"
        "if TYPE_CHECKING:\n"
        "    from fakepkg.stage_b import B\n"
        "def run(progress=None):\n"
        "    pass\n"
    ),
    "stage_b.py": (
        "import importlib\n"
        "class B:\n"
        "    pass\n"
        "def errors():\n"
        "    return importlib.import_module('fakepkg.errors')\n"
    ),
    "pipeline.py": "from . import stage_a\nfrom fakepkg import stage_b\n\ndef go():\n    pass\n",
    "cli/__init__.py": "import typer\nfrom fakepkg import run\n\ndef main():\n    pass\n",
    "cli/commands/__init__.py": "",
    "cli/commands/show.py": "from rich.console import Console\nfrom ... import pipeline\nfrom .. import main\n",
}


def write_package(root: Path, files: Mapping[str, str]) -> Path:
    package_root = root / "src" / FAKE
    for relative, text in files.items():
        path = package_root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return package_root


def fake_violations(tmp_path: Path, changed: Optional[Mapping[str, str]] = None) -> list[str]:
    """Violations of the clean fake package with the files in ``changed`` replaced or added."""
    package_root = write_package(tmp_path, {**CLEAN_FILES, **(changed or {})})
    return check_contract(package_root, FAKE, FAKE_LAYERS, allowed_upward=frozenset({("__main__", "cli")}))


def only(violations: list[str]) -> str:
    assert len(violations) == 1, "\n".join(violations)
    return violations[0]


def test_clean_fake_package_passes(tmp_path):
    assert fake_violations(tmp_path) == []


def test_upward_import_fails_with_the_edge_and_its_place(tmp_path):
    message = only(fake_violations(tmp_path, {"names.py": "from .errors import Oops\nfrom fakepkg.stage_a import run\n"}))
    assert message == "fakepkg.names -> fakepkg.stage_a (fakepkg/names.py:2): leaf may not import stages"


def test_every_offending_edge_is_listed(tmp_path):
    text = "def f():\n    from fakepkg import pipeline\n\ndef g():\n    from fakepkg.pipeline import go\n"
    assert fake_violations(tmp_path, {"stage_b.py": text}) == [
        "fakepkg.stage_b -> fakepkg.pipeline (fakepkg/stage_b.py:2): stages may not import pipeline",
        "fakepkg.stage_b -> fakepkg.pipeline (fakepkg/stage_b.py:5): stages may not import pipeline",
    ]


def test_relative_imports_are_resolved(tmp_path):
    message = only(fake_violations(tmp_path, {"modules/merge.py": "from .. import pipeline\n"}))
    assert message.startswith("fakepkg.modules.merge -> fakepkg.pipeline (fakepkg/modules/merge.py:1)")


def test_from_package_import_a_name_is_an_edge_to_the_api(tmp_path):
    message = only(fake_violations(tmp_path, {"stage_b.py": "from fakepkg import run\n"}))
    assert message == "fakepkg.stage_b -> fakepkg (fakepkg/stage_b.py:1): stages may not import api"


def test_from_module_import_a_submodule_is_an_edge_to_the_submodule(tmp_path):
    message = only(fake_violations(tmp_path, {"errors.py": "from fakepkg.modules import merge\n"}))
    assert message.startswith("fakepkg.errors -> fakepkg.modules.merge (fakepkg/errors.py:1)")


def test_import_module_with_a_literal_is_an_edge(tmp_path):
    text = "import importlib\n\ndef later():\n    importlib.import_module('.pipeline', package='fakepkg')\n"
    message = only(fake_violations(tmp_path, {"stage_b.py": text}))
    assert message.startswith("fakepkg.stage_b -> fakepkg.pipeline (fakepkg/stage_b.py:4)")


def test_cycle_through_a_function_level_import_fails(tmp_path):
    # stage_a imports stage_b under TYPE_CHECKING; stage_b imports stage_a inside a function.
    text = "class B:\n    pass\n\ndef later():\n    from fakepkg.stage_a import run\n"
    message = only(fake_violations(tmp_path, {"stage_b.py": text}))
    assert message == (
        "import cycle fakepkg.stage_a -> fakepkg.stage_b -> fakepkg.stage_a: "
        "fakepkg.stage_a -> fakepkg.stage_b (fakepkg/stage_a.py:5); "
        "fakepkg.stage_b -> fakepkg.stage_a (fakepkg/stage_b.py:5)"
    )


def test_cycle_inside_one_layer_fails(tmp_path):
    message = only(fake_violations(tmp_path, {"errors.py": "import fakepkg.names\n"}))
    assert message.startswith("import cycle fakepkg.errors -> fakepkg.names -> fakepkg.errors:")


@pytest.mark.parametrize(
    "text",
    ["import rich\n", "def show():\n    from rich.progress import Progress\n", "import importlib\nimportlib.import_module('typer')\n"],
)
def test_rich_or_typer_outside_the_cli_fails(tmp_path, text):
    message = only(fake_violations(tmp_path, {"stage_a.py": text}))
    assert message.startswith("fakepkg.stage_a -> ") and "only inside cli/" in message


@pytest.mark.parametrize("new_file", ["extra.py", "modules/extra.py"])
def test_module_missing_from_the_table_fails(tmp_path, new_file):
    message = only(fake_violations(tmp_path, {new_file: ""}))
    assert message == (
        f"fakepkg.{new_file[:-3].replace('/', '.')} (fakepkg/{new_file}) is in no layer: "
        "add it to the table in tests/test_layers.py and docs/DESIGN.md"
    )


def test_import_of_a_module_that_does_not_exist_fails(tmp_path):
    message = only(fake_violations(tmp_path, {"stage_b.py": "from fakepkg.gone import this, that\n"}))
    assert message == "fakepkg.stage_b -> fakepkg.gone (fakepkg/stage_b.py:1): no such module in fakepkg"


def test_only_the_named_upward_edge_is_allowed(tmp_path):
    text = CLEAN_FILES["__init__.py"] + "from fakepkg.cli import main\n"
    message = only(fake_violations(tmp_path, {"__init__.py": text}))
    assert message == "fakepkg -> fakepkg.cli (fakepkg/__init__.py:3): api may not import cli"


def test_scripts_must_not_import_the_cli(tmp_path):
    scripts = {
        "a.py": "from fakepkg.cli.commands.show import Console\n",
        "b.py": "def main():\n    from fakepkg import cli\n",
        "c.py": "from fakepkg.pipeline import go\nfrom fakepkg import client_of_cli\nfrom . import cli\n",
    }
    for name, text in scripts.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    assert check_scripts(tmp_path.glob("*.py"), FAKE, tmp_path.parent) == [
        f"{tmp_path.name}/a.py:1 imports fakepkg.cli.commands.show: scripts call the library, not the CLI",
        f"{tmp_path.name}/b.py:2 imports fakepkg.cli: scripts call the library, not the CLI",
    ]


def test_design_doc_table_is_read():
    doc = (
        "## Layers\n\n| layer | modules | may import |\n|---|---|---|\n"
        "| leaf | `a`, `b` | leaves |\n| cli | `cli.*` | all |\n\n## Next\n| leaf | `c` | x |\n"
    )
    assert documented_layers(doc) == {"a": "leaf", "b": "leaf", "cli.*": "cli"}


# ----------------------------------------------------------------------------- the real tree


def test_package_follows_the_layer_contract():
    violations = check_contract(PACKAGE_ROOT, PACKAGE, LAYERS, allowed_upward=ALLOWED_UPWARD)
    assert not violations, f"{len(violations)} import-contract violations:\n" + "\n".join(violations)


def test_benchmarks_and_examples_call_the_library_not_the_cli():
    scripts = [path for folder in SCRIPT_DIRS for path in (REPO / folder).glob("*.py")]
    violations = check_scripts(scripts, PACKAGE, REPO)
    assert not violations, "\n".join(violations)


def test_design_doc_lists_the_same_layers():
    documented = documented_layers(DESIGN_DOC.read_text(encoding="utf-8"))
    assert documented == LAYERS, (
        "docs/DESIGN.md (## Layers) and LAYERS in tests/test_layers.py differ: "
        f"only in the doc {sorted(set(documented.items()) - set(LAYERS.items()))}, "
        f"only in the test {sorted(set(LAYERS.items()) - set(documented.items()))}"
    )
