"""The import structure (README, Development): every moewatch module sits in one layer and imports only
from its own layer or lower ones; no import cycles, counting imports inside functions; importing a low
layer does not load the heavy dependencies of a higher one. An import that must go upward carries an
``# upward: <reason>`` comment on its line."""

from __future__ import annotations

import ast
import fnmatch
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "moewatch"

#: Lowest first. A module's layer is that of the first pattern it matches.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("leaf", ("moewatch._version", "moewatch._lazy", "moewatch._once", "moewatch.errors")),
    (
        "settings",
        (
            "moewatch.confighints",
            "moewatch.trend_settings",
            "moewatch.alerting.settings",
            "moewatch.exporter.settings",
            "moewatch.config",
        ),
    ),
    (
        "model",
        (
            "moewatch.report",
            "moewatch.agreement",
            "moewatch.metrics",
            "moewatch.noise",
            "moewatch.health",
            "moewatch.sinks.base",
            "moewatch.adapters.base",
            "moewatch.optim",
        ),
    ),
    (
        "core",
        (
            "moewatch.accumulator",
            "moewatch.adapters*",
            "moewatch.flush",
            "moewatch.window",
            "moewatch.trend",
            "moewatch.resume",
            "moewatch.compiled",
            "moewatch.plain",
            "moewatch.capture",
        ),
    ),
    ("monitor", ("moewatch.monitor",)),
    ("sinks", ("moewatch.sinks.console", "moewatch.sinks.jsonl", "moewatch.exporter*", "moewatch.alerting*")),
    ("assembly", ("moewatch.sinks", "moewatch.sinks.factory", "moewatch.attaching", "moewatch")),
    (
        "apps",
        (
            "moewatch.integrations*",
            "moewatch.cli*",
            "moewatch.demo*",
            "moewatch.scan",
            "moewatch.offline_report",
            "moewatch.__main__",
        ),
    ),
]
#: Modules of the sinks layer that are tools run from the command line, above the sinks they describe.
APPS = ("moewatch.alerting.cli", "moewatch.exporter.generate")


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def layer_of(module: str) -> int:
    if module in APPS:
        return len(LAYERS) - 1
    for i, (_, patterns) in enumerate(LAYERS):
        if any(fnmatch.fnmatchcase(module, p) for p in patterns):
            return i
    raise AssertionError(f"{module} is in no layer: add it to LAYERS in tests/test_layers.py and the README")


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imports(module: str) -> list[tuple[str, int, bool]]:
    """(imported moewatch module, line, marked upward) for every runtime import, top level or not."""
    path = MODULES[module]
    source = path.read_text()
    lines = source.splitlines()
    tree = ast.parse(source)
    is_pkg = path.name == "__init__.py"
    typing_only: set[int] = set()
    for node in ast.walk(tree):
        if _is_type_checking(node):
            typing_only.update(id(n) for n in ast.walk(node))
    out = []
    for node in ast.walk(tree):
        if id(node) in typing_only or not isinstance(node, ast.Import | ast.ImportFrom):
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            base = module.split(".") if is_pkg else module.split(".")[:-1]
            if node.level:
                base = base[: len(base) - node.level + 1]
                prefix = ".".join([*base, node.module] if node.module else base)
            else:
                prefix = node.module or ""
            targets = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in MODULES else prefix for a in node.names]
        marked = "# upward:" in lines[node.lineno - 1]
        for target in targets:
            if not target.startswith("moewatch"):
                continue
            while target not in MODULES and "." in target:
                target = target.rsplit(".", 1)[0]
            if target != module:
                out.append((target, node.lineno, marked))
    return out


def test_every_module_has_a_layer() -> None:
    for module in MODULES:
        layer_of(module)


def test_no_upward_imports_without_a_stated_reason() -> None:
    upward = [
        f"{m}:{line} imports {t} ({LAYERS[layer_of(t)][0]} is above {LAYERS[layer_of(m)][0]})"
        for m in MODULES
        for t, line, marked in imports(m)
        if layer_of(t) > layer_of(m) and not marked
    ]
    assert upward == []


def _with_packages(module: str, targets: set[str]) -> set[str]:
    # Importing a.b.c runs a/__init__ and a/b/__init__ first: those are edges too (a package __init__
    # that imports its submodules eagerly is how a cycle through a settings module used to hide).
    out = set()
    for t in targets:
        parts = t.split(".")
        out |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)} & MODULES.keys()
    return {t for t in out if t != module and not module.startswith(t + ".")}


def test_no_import_cycles() -> None:
    graph = {m: sorted(_with_packages(m, {t for t, _, _ in imports(m)})) for m in MODULES}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in graph[m]:
            if state.get(t) == 1:
                cycles.append([*path[path.index(t):], t])
            elif t not in state:
                visit(t, [*path, t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert cycles == []


@pytest.mark.parametrize(
    ("module", "must_not_load"),
    [
        ("moewatch.health", ("prometheus_client", "requests", "rich", "urllib3", "wsgiref", "torch")),
        ("moewatch.config", ("prometheus_client", "requests", "rich", "torch")),
        ("moewatch.monitor", ("prometheus_client", "requests", "rich")),
        ("moewatch.sinks.base", ("prometheus_client", "requests", "rich", "torch")),
        ("moewatch", ("torch", "prometheus_client", "requests", "rich", "pydantic")),
    ],
)
def test_importing_a_low_layer_does_not_load_higher_ones(module: str, must_not_load: tuple[str, ...]) -> None:
    code = (
        f"import sys, {module}\n"
        f"print(' '.join(sorted({{m.split('.')[0] for m in sys.modules}} & {set(must_not_load)!r})))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.split() == [], f"import {module} loaded {loaded.strip()}"
