"""The core's layers: imports go one way, no circles, no private names across modules, and plugins use
only the public API. Walks every import statement of the source (also those inside functions and
``if TYPE_CHECKING:`` blocks), so a lazy import cannot hide a wrong-way dependency."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "finetune"

#: Bottom to top. A module may import its own layer and the layers below, never above.
LAYERS = {"errors": 0, "contract": 1, "engine": 2, "run": 3, "cli": 4, "testing": 4, "reference": 4, "__main__": 4}


def module_name(path: Path, root: Path = REPO) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path) -> list[tuple[str, list[str], int]]:
    """``(module, imported names, line)`` for every ``finetune`` import in a file (relative imports resolved)."""
    tree = ast.parse(path.read_text(), str(path))
    me = module_name(path)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, [], node.lineno) for alias in node.names if alias.name.split(".")[0] == "finetune"]
        elif isinstance(node, ast.ImportFrom):
            target = node.module or ""
            if node.level:
                base = me.split(".")[: len(me.split(".")) - node.level + (path.name == "__init__.py")]
                target = ".".join(base + ([target] if target else []))
            if target.split(".")[0] == "finetune":
                out.append((target, [a.name for a in node.names], node.lineno))
    return out


def layer_of(module: str) -> int | None:
    parts = module.split(".")
    if parts == ["finetune"]:
        return None  # the facade (public API)
    return LAYERS[parts[1]]


def core_modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def test_every_core_module_belongs_to_a_layer():
    for module in core_modules():
        if module != "finetune":
            assert module.split(".")[1] in LAYERS, f"{module}: not in a layer; add it to one (docs/design.md)"


def test_imports_go_one_way():
    wrong = []
    for module, path in core_modules().items():
        mine = layer_of(module)
        for target, _names, line in imports_of(path):
            if target == "finetune":
                # the facade imports layers 0-3; only the top layer (which it does not import) may use it
                if module != "finetune" and mine < LAYERS["cli"]:
                    wrong.append(f"{path.relative_to(REPO)}:{line} imports the facade `finetune`; import the module")
                continue
            theirs = layer_of(target)
            if mine is not None and theirs is not None and theirs > mine:
                wrong.append(f"{path.relative_to(REPO)}:{line} ({module}, layer {mine}) imports {target} "
                             f"(layer {theirs})")
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)


def _graph() -> dict[str, set[str]]:
    modules = core_modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        for target, names, _ in imports_of(path):
            for name in names or [""]:
                sub = f"{target}.{name}" if name else target
                dep = sub if sub in modules else target
                if dep in modules and dep != module and not dep.startswith(module + "."):
                    graph[module].add(dep)
    return graph


def test_no_import_circles():
    graph = _graph()
    graph.pop("finetune")  # the facade imports the public names; nothing imports it
    for deps in graph.values():
        deps.discard("finetune")
    state: dict[str, int] = {}
    circles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                circles.append(stack[stack.index(dep):] + [dep] if dep in stack else [node, dep])
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not circles, "import circles:\n" + "\n".join(" -> ".join(c) for c in circles)


def test_no_private_names_across_modules():
    modules = core_modules()
    found = []
    for module, path in modules.items():
        tree = ast.parse(path.read_text())
        aliases = {}
        for target, names, line in imports_of(path):
            if target != module:
                found += [f"{path.relative_to(REPO)}:{line} imports {target}.{n}" for n in names
                          if n.startswith("_") and not n.startswith("__")]
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("finetune"):
                for alias in node.names:
                    if f"{node.module}.{alias.name}" in modules:
                        aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                found.append(f"{path.relative_to(REPO)}:{node.lineno} uses {aliases[node.value.id]}.{node.attr}")
    assert not found, "private names used across modules:\n" + "\n".join(found)


def plugin_sources() -> list[Path]:
    roots = [REPO / "plugins", REPO / "examples" / "plugins"]
    return [p for root in roots for p in root.rglob("*.py") if "tests" not in p.parts]


@pytest.mark.parametrize("path", plugin_sources(), ids=lambda p: str(p.relative_to(REPO)))
def test_plugins_use_only_the_public_api(path):
    import finetune

    for target, names, line in imports_of(path):
        where = f"{path.relative_to(REPO)}:{line}"
        assert target == "finetune", f"{where} imports {target}; a plugin imports only `from finetune import ...`"
        missing = [n for n in names if n not in finetune.__all__]
        assert not missing, f"{where} imports {missing}, which are not in finetune.__all__"


def test_every_public_name_is_a_real_export():
    import finetune

    assert len(finetune.__all__) == len(set(finetune.__all__))
    for name in finetune.__all__:
        assert hasattr(finetune, name), name
