"""The house plan, checked: no import cycles (module-level or inside functions), no task or method name lists
outside tasks/ and methods/, small modules, and a command line that does not import torch to print its help."""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "tunelab"


def _modules() -> dict[str, Path]:
    out = {}
    for path in SRC.rglob("*.py"):
        parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """module → the tunelab modules it imports anywhere in its code (not the implicit parent packages)."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[:len(base) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                for alias in node.names:
                    candidate = f"{target}.{alias.name}"
                    edges.add(candidate if candidate in modules else target)
            elif isinstance(node, ast.Import):
                edges |= {a.name for a in node.names}
        graph[name] = {e for e in edges if e in modules and e != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    """Every edge counts, a package's __init__ importing its submodules too: a submodule that imports its own
    package (a registry's helper, `__version__`) back is a cycle Python papers over with a half-made module."""
    assert _cycles(import_graph()) == []


def test_the_cycle_check_can_fail():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_cycle_check_sees_a_package_and_a_function_level_import(tmp_path, monkeypatch):
    """The two cycles this test once missed, rebuilt in a scratch package: a registry package importing its
    submodules, one of which imports a helper from the package inside a function; and a submodule importing
    the package's API back."""
    pkg = tmp_path / "tunelab"
    (pkg / "tasks").mkdir(parents=True)
    (pkg / "__init__.py").write_text("def train():\n    from .train import train\n")
    (pkg / "train.py").write_text("from . import __version__\n")
    (pkg / "tasks" / "__init__.py").write_text("def helper():\n    pass\n\nfrom . import classify\n")
    (pkg / "tasks" / "classify.py").write_text("def evaluate():\n    from . import helper\n")
    monkeypatch.setattr(sys.modules[__name__], "SRC", pkg)
    assert sorted(_cycles(import_graph())) == [["tunelab", "tunelab.train"],
                                               ["tunelab.tasks", "tunelab.tasks.classify"]]


def private_imports() -> list[str]:
    """`from tunelab.x import _name` anywhere in the package: a module reaching into another's insides."""
    out = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("tunelab")):
                out += [f"{name}: {node.module or '.'}.{a.name}" for a in node.names
                        if a.name.startswith("_") and not a.name.startswith("__")]
    return out


def test_no_private_name_is_imported_across_modules():
    assert private_imports() == []


# Outside tasks/ and methods/, code asks a task or method for its traits instead of comparing names.
_NAMES = re.compile(r"""(\btask\b|\.task\b|method\.name|\bmethod\b)\s*(==|!=|\bin\b|\bnot in\b)\s*[(\["']""")


def test_no_task_or_method_name_lists_outside_their_packages():
    offenders = []
    for name, path in _modules().items():
        if name.startswith(("tunelab.tasks", "tunelab.methods")):
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if _NAMES.search(line):
                offenders.append(f"{path.relative_to(SRC)}:{number}: {line.strip()}")
    assert offenders == []


def test_no_module_is_a_monolith():
    sizes = {str(p.relative_to(SRC)): len(p.read_text().splitlines()) for p in _modules().values()}
    assert sizes["train.py"] < 250
    assert {k: v for k, v in sizes.items() if v > 420} == {}


def test_the_command_line_answers_without_torch(tmp_path):
    bad = tmp_path / "typo.yaml"
    bad.write_text("model: {name: minilm}\ndata: {train: sample:sentiment_uci}\nmethod: lora\ntrian: {lr: 1}\n")
    probe = ("import sys; from tunelab.cli import main\n"
             "for argv in (['--help'], ['models'], ['validate', sys.argv[1]]):\n"
             "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
             "heavy = [m for m in ('torch', 'transformers', 'peft', 'trl', 'datasets', 'pandas') if m in sys.modules]\n"
             "print('HEAVY', heavy)")
    out = subprocess.run([sys.executable, "-c", probe, str(bad)], capture_output=True, text=True, timeout=120)
    assert "HEAVY []" in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]
    assert "trian" in out.stderr  # the typo was reported
