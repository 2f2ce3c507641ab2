"""The layout holds: imports run one way (commands -> parts -> shared), and nowhere in a circle.

- `strop/` is what every part shares: it imports no part, no command and not `judge/`;
- `judge/` is pure reward code: it imports nothing of the project;
- `service/`, `worker/` and `learner/` never import each other; the service imports no Celery;
- `ops/` (the commands) sits above all and may import anything;
- no import circle, counting imports inside functions too (a deferred import still ties
  two modules together).

Read from the source with `ast`, so it needs nothing installed and nothing imported.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("strop", "judge", "service", "worker", "learner", "ops")
PARTS = {"service", "worker", "learner"}
# what each package may import of the project (besides itself)
ALLOWED = {
    "strop": set(),
    "judge": set(),
    "service": {"strop", "judge"},
    "worker": {"strop", "judge"},
    "learner": {"strop", "judge"},
    "ops": set(PACKAGES),
}
FORBIDDEN_LIBRARIES = {"service": {"celery", "kombu"}}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def imports_of(path: Path, name: str) -> list[tuple[str, int]]:
    """(imported module, line) for every import in the file, relative ones resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.append((target, node.lineno))
            # `from pkg import mod` imports the module pkg.mod
            out += [(f"{target}.{alias.name}", node.lineno) for alias in node.names]
    return out


def graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports (anywhere in the file)."""
    mods = modules()
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        for target, _ in imports_of(path, name):
            if target in mods and target != name:
                edges[name].add(target)
    return edges


def upward_imports() -> list[str]:
    """`file:line imports package` for each import statement that breaks the layout."""
    found = set()
    for name, path in modules().items():
        own = name.split(".")[0]
        for target, line in imports_of(path, name):
            top = target.split(".")[0]
            allowed = top == own or top not in PACKAGES or top in ALLOWED[own]
            if not allowed or top in FORBIDDEN_LIBRARIES.get(own, ()):
                found.add(f"{path.relative_to(ROOT)}:{line} imports {top}")
    return sorted(found)


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
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
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_layout_no_upward_or_sideways_import():
    assert upward_imports() == []


def test_layout_no_import_circle():
    assert cycles(graph()) == []


def test_layout_checker_sees_a_circle_and_an_upward_import(tmp_path):
    # the checks above would pass vacuously if the walker found no imports at all
    edges = graph()
    assert "strop.settings" in edges["service.app"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    bad = tmp_path / "x.py"
    bad.write_text("def f():\n    from worker.app import create_app\n")
    assert ("worker.app", 2) in imports_of(bad, "strop.x")
