"""The layers of docs/architecture.md, checked on the source: no import cycle among the project's modules
(imports inside functions count), no script imports another script, and model.py stays the model alone."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT_DIRS = ("demos", "bench")
SCRIPTS = ("train.py", "sample.py")


def project_files():
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith((".", "__")) and d not in ("data", "tests", "out")]
        for name in files:
            if name.endswith(".py"):
                yield os.path.relpath(os.path.join(folder, name), ROOT)


def module_of(path):
    parts = path[:-3].split(os.sep)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def resolve(name, modules, importer_dir):
    """The project module an import of `name` loads (a submodule when it is one), or None for outside ones."""
    for candidate in (name, f"{importer_dir}.{name}" if importer_dir else None):
        if candidate in modules:
            return candidate
    return None


def import_graph():
    files = list(project_files())
    modules = {module_of(f): f for f in files}
    graph = {}
    for module, path in modules.items():
        with open(os.path.join(ROOT, path), encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        importer_dir = ".".join(path.split(os.sep)[:-1])
        edges = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
            else:
                continue
            for name in names:
                target = resolve(name, modules, importer_dir)
                if target is not None and target != module:
                    edges.add(target)
                    if isinstance(node, ast.ImportFrom) and name != node.module:
                        break  # `from package import submodule` loads the submodule, not (only) the package
        graph[module] = edges
    return graph, modules


def find_cycle(graph):
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def is_script(path):
    return path in SCRIPTS or path.split(os.sep)[0] in SCRIPT_DIRS


def test_no_import_cycle():
    graph, _ = import_graph()
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_script_imports_a_script():
    graph, modules = import_graph()
    wrong = [(a, b) for a, targets in graph.items() for b in targets
             if is_script(modules[a]) and is_script(modules[b])]
    assert not wrong, f"scripts import scripts: {wrong}"


def test_nothing_under_the_model_imports_over_it():
    """quantization's math and QAT layers (what model.py builds on) import neither model.py nor anything over it."""
    graph, _ = import_graph()
    below = {"quantization.quantizers", "quantization.layers", "quantization.hadamard", "quantization.binary_linear",
             "safety", "tokenizer", "checkpoint", "cli"}
    for module in below:
        assert graph[module] <= below, f"{module} imports {sorted(graph[module] - below)}, which sit over it"
    assert graph["model"] <= below


def test_the_finder_sees_a_cycle():
    """The checker itself: a cycle hidden behind an import inside a function is found."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
