"""Import boundaries: the layer loads no torch; plugins import nothing of the gateway.

vLLM's API-server process imports the middleware; torch there only costs start
time and memory (the engine runs elsewhere), and the wire format of decision
reports is the one thing both ends share.
"""

from __future__ import annotations

import json
import subprocess
import sys


def _modules_after(statement: str) -> set[str]:
    code = f"import sys, json; {statement}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_importing_the_middleware_alone_loads_no_torch():
    loaded = _modules_after("import refusal_gateway.middleware")
    assert "refusal_gateway.middleware" in loaded
    assert not {m for m in loaded if m == "torch" or m.startswith("torch.")}


def test_plugins_import_nothing_of_the_gateway():
    loaded = _modules_after("import refusal_plugins.v1, refusal_plugins.wire, refusal_plugins.core")
    assert not {m for m in loaded if m.startswith("refusal_gateway")}
    assert not {m for m in loaded if m.startswith("refusal_training")}


def test_the_model_plugin_entry_point_loads_no_torch():
    """vLLM calls ``refusal_plugins.registry:register`` in every process, the API server's too."""
    loaded = _modules_after("import refusal_plugins.registry")
    assert not {m for m in loaded if m == "torch" or m.startswith(("torch.", "vllm"))}


def test_the_model_plugin_is_an_installed_vllm_general_plugin():
    from importlib.metadata import entry_points

    plugins = {e.name: e.value for e in entry_points(group="vllm.general_plugins")}
    assert plugins.get("refusal_model") == "refusal_plugins.registry:register"


def test_serving_imports_nothing_of_the_training_kit():
    """``refusal-gateway serve`` builds named models in a child process (refusal_training.build)."""
    loaded = _modules_after(
        "import refusal_gateway.cli, refusal_gateway.launcher, refusal_gateway.middleware, "
        "refusal_gateway.vllm_entry; refusal_gateway.cli.parser()"
    )
    assert not {m for m in loaded if m.startswith("refusal_training")}


def test_the_training_kit_imports_nothing_of_the_gateway():
    """The kit shares the plugins' vocabulary and rule, never the gateway's modules."""
    import pkgutil

    import refusal_training

    names = [f"refusal_training.{m.name}" for m in pkgutil.iter_modules(refusal_training.__path__)]
    loaded = _modules_after("import " + ", ".join(names))
    assert not {m for m in loaded if m.startswith("refusal_gateway")}


def test_no_import_cycles_between_modules():
    """No module of ours reaches itself through the imports it makes (at any depth)."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    packages = {"refusal_gateway": root / "server", "refusal_plugins": root / "plugins",
                "refusal_training": root / "training" / "refusal_training"}
    graph: dict[str, set[str]] = {}
    for package, folder in packages.items():
        for path in folder.rglob("*.py"):
            name = ".".join([package, *path.relative_to(folder).with_suffix("").parts])
            name = name.removesuffix(".__init__")
            deps: set[str] = set()
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom):
                    base = node.module or ""
                    if node.level:
                        parent = name.rsplit(".", node.level)[0]
                        base = f"{parent}.{base}" if base else parent
                    deps |= {base} | {f"{base}.{a.name}" for a in node.names}
                elif isinstance(node, ast.Import):
                    deps |= {a.name for a in node.names}
            graph[name] = deps
    graph = {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}

    def cycle_from(start: str) -> list[str] | None:
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for dep in graph[node]:
                if dep == start:
                    return path
                if dep not in seen:
                    seen.add(dep)
                    stack.append((dep, [*path, dep]))
        return None

    cycles = [c for m in sorted(graph) if (c := cycle_from(m))]
    assert not cycles, f"import cycles: {cycles[:3]}"
