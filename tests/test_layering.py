"""The package's import structure: dependencies run one way (no import cycles, lazy imports
inside functions included) and no module reaches into another's private names."""
import ast
from pathlib import Path

import m3ae

SRC = Path(m3ae.__file__).parent


def _imports() -> dict[str, list[tuple[str, str]]]:
    """module -> [(imported module, imported name or "")] for every import in its source."""
    out = {}
    for path in SRC.rglob("*.py"):
        parts = ["m3ae", *path.relative_to(SRC).with_suffix("").parts]
        package = parts[:-1]
        if parts[-1] == "__init__":
            parts = package
        found = []
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package[: len(package) - node.level + 1] if node.level else []
                module = ".".join(base + ([node.module] if node.module else []))
                found += [(module, a.name) for a in node.names]
            elif isinstance(node, ast.Import):
                found += [(a.name, "") for a in node.names]
        out[".".join(parts)] = found
    return out


def test_no_import_cycles():
    imports = _imports()
    graph = {}
    for mod, found in imports.items():
        targets = set()
        for module, name in found:
            target = f"{module}.{name}" if f"{module}.{name}" in imports else module
            # A package importing its own submodules is how packages are built, not a cycle.
            if target in imports and target != mod and not target.startswith(mod + "."):
                targets.add(target)
        graph[mod] = targets
    done, path = set(), []

    def visit(mod):
        assert mod not in path, "import cycle: " + " -> ".join(path[path.index(mod):] + [mod])
        if mod in done:
            return
        path.append(mod)
        for target in sorted(graph[mod]):
            visit(target)
        path.pop()
        done.add(mod)

    for mod in sorted(graph):
        visit(mod)
    assert "m3ae.pretrained" in graph["m3ae.model"]  # the direction: model -> pretrained


def test_no_module_imports_its_own_package():
    # A package's __init__ only hands on its modules' names; a module that takes a name back
    # from it (as data/webdataset.py once took dist_info from m3ae.data) imports upwards.
    imports = _imports()
    upward = [f"{mod} imports {module}.{name}" for mod, found in imports.items() for module, name in found
              if mod.startswith(module + ".") and module.count(".") == mod.count(".") - 1
              and f"{module}.{name}" not in imports]
    assert not upward, upward


def test_no_private_imports_across_modules():
    private = [f"{mod} imports {module}.{name}" for mod, found in _imports().items() for module, name in found
               if module.startswith("m3ae") and name.startswith("_") and not name.startswith("__")
               and module != mod]
    assert not private


def test_evaluation_does_not_reach_into_training():
    # Evaluation shares the optimiser module (m3ae.optim) and device names (m3ae.device) with
    # training; it imports neither the trainer nor anything under m3ae.training.
    reach = sorted({f"{mod} imports {module}" for mod, found in _imports().items() for module, _ in found
                    if mod.startswith("m3ae.evaluation") and
                    (module == "m3ae.training" or module.startswith("m3ae.training."))})
    assert not reach, reach
