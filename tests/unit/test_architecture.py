"""The architecture (docs/architecture.md), checked on the source and on a fresh interpreter.

An AST walk over every module of klstore/ collects its imports (statements at module
level and inside functions, and importlib.import_module calls) and checks them against
the table of layers below: no arrow may point the wrong way, and the module-level
klstore imports may not form a cycle.
A subprocess then imports the torch-free half of the package and reads a config,
a prompt file and a store, and torch, transformers and ray must stay unloaded.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "klstore"

# layer: (its modules, the other layers it may import). "klstore.x.*" is the package
# klstore.x and every module in it; a plain name is that module alone. A layer may
# import its own modules (acyclically at module level). Read it as the table in
# docs/architecture.md, from the ground floor up.
LAYERS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "package": (("klstore",), ()),  # klstore/__init__.py: __version__ and lazy API names
    "errors": (("klstore.errors",), ()),
    "spec": (("klstore.spec.*",), ("errors",)),
    "config": (("klstore.config", "klstore.output"), ("spec", "errors")),
    "core": (("klstore.core.*",), ("config", "spec", "errors")),
    "store": (("klstore.store.*",), ("config", "spec", "errors")),
    "report": (("klstore.report.*",), ("store", "config", "spec", "errors", "package")),
    "run": (("klstore.run.*",), ("core", "store", "spec", "errors", "package")),
    "entry": (
        ("klstore.cli", "klstore.demo", "klstore.__main__", "klstore.api"),
        ("run", "report", "store", "core", "config", "spec", "errors", "package"),
    ),
}

# Arrows allowed only inside a function (taken on first use, never at import time):
# `klstore.load` etc. resolve to klstore.api lazily, so `import klstore` stays light.
LAZY_ONLY = {"package": ("entry", "errors")}

# Third-party libraries with a fence: who may import them, at any level.
ONLY_IMPORTED_BY = {"ray": ("klstore.run.runner",)}

# Libraries that load torch, and the layers that never import them (not even in a function).
TORCH = ("torch", "transformers", "safetensors.torch")
TORCH_FREE = ("package", "errors", "spec", "config", "store", "report")

# The ground floor touches no file: its modules import no file library and call no function that
# reads, writes or looks at a path (reading and path checks are klstore.config's).
NO_FILES = ("spec",)
FILE_LIBRARIES = ("tempfile", "shutil", "glob", "io", "yaml")
FILE_CALLS = {
    "open", "exists", "lexists", "is_file", "is_dir", "isdir", "isfile", "access", "stat", "lstat",
    "read_text", "read_bytes", "write_text", "write_bytes", "mkstemp", "mkdtemp", "unlink", "remove",
    "listdir", "scandir", "iterdir", "glob", "mkdir", "makedirs", "expanduser", "realpath", "getcwd",
}  # fmt: skip


@dataclass(frozen=True)
class Import:
    source: str  # the importing klstore module
    target: str  # a klstore module (submodules resolved) or a third-party name as written
    line: int
    module_level: bool  # runs when `source` is imported (not inside a function)

    def where(self) -> str:
        return f"{self.source}:{self.line} imports {self.target}"


def module_names(root: Path) -> dict[str, Path]:
    """Dotted name -> file of every module under root (root's folder name is the package)."""
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


class _ImportVisitor(ast.NodeVisitor):
    def __init__(self, module: str, is_package: bool, known: set[str]):
        self.module, self.known = module, known
        self.package = module if is_package else module.rpartition(".")[0]
        self.depth = 0  # > 0 inside a function body
        self.found: list[Import] = []
        self.named: list[tuple[str, ast.AST]] = []  # string constants naming a klstore module
        self.dynamic: list[bool] = []  # importlib.import_module(<not a constant>): module level?

    def _add(self, target: str, node: ast.AST) -> None:
        self.found.append(Import(self.module, target, node.lineno, self.depth == 0))

    def _function(self, node) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def visit_Constant(self, node: ast.Constant) -> None:
        if isinstance(node.value, str) and node.value in self.known and "." in node.value:
            self.named.append((node.value, node))

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        if name in ("import_module", "__import__") and node.args:
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                self._add(arg.value, node)
            else:
                self.dynamic.append(self.depth == 0)
        self.generic_visit(node)

    def finish(self) -> list[Import]:
        """A computed import_module(name) may import any klstore module that this module
        names in a string constant (e.g. a table of lazy attributes)."""
        if self.dynamic:
            self.found += [Import(self.module, target, node.lineno, any(self.dynamic)) for target, node in self.named]
        return self.found

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = node.module or ""
        if node.level:  # relative: climb from this module's package
            anchor = self.package.split(".")
            anchor = anchor[: len(anchor) - (node.level - 1)]
            base = ".".join(anchor + ([base] if base else []))
        for alias in node.names:
            submodule = f"{base}.{alias.name}"
            self._add(submodule if submodule in self.known else base, node)


def collect_imports(root: Path) -> list[Import]:
    """Every import statement of every module under root, with klstore submodules resolved."""
    modules = module_names(root)
    found = []
    for name, path in modules.items():
        visitor = _ImportVisitor(name, path.name == "__init__.py", set(modules))
        visitor.visit(ast.parse(path.read_text(encoding="utf-8"), str(path)))
        found += visitor.finish()
    return found


def _matches(module: str, pattern: str) -> bool:
    if pattern.endswith(".*"):
        package = pattern[:-2]
        return module == package or module.startswith(package + ".")
    return module == pattern


def layer_of(module: str) -> str | None:
    for layer, (patterns, _) in LAYERS.items():
        if any(_matches(module, p) for p in patterns):
            return layer
    return None


def _is(target: str, library: str) -> bool:
    return target == library or target.startswith(library + ".")


def wrong_arrows(root: Path) -> list[str]:
    """Every import that breaks the table (klstore arrows, fenced and torch libraries)."""
    problems = [f"{m}: in no layer of the table" for m in module_names(root) if layer_of(m) is None]
    internal = set(module_names(root))
    for imp in collect_imports(root):
        source_layer = layer_of(imp.source)
        if source_layer is None:
            continue
        if imp.target in internal:
            target_layer = layer_of(imp.target)
            lazy = LAZY_ONLY.get(source_layer, ())
            allowed = LAYERS[source_layer][1] + (() if imp.module_level else lazy)
            if target_layer != source_layer and target_layer not in allowed:
                when = " at import time" if target_layer in lazy else ""
                problems.append(f"{imp.where()}: {source_layer} may not import {target_layer}{when}")
            continue
        for library, importers in ONLY_IMPORTED_BY.items():
            if _is(imp.target, library) and imp.source not in importers:
                problems.append(f"{imp.where()}: only {', '.join(importers)} may import {library}")
        if source_layer in TORCH_FREE and any(_is(imp.target, lib) for lib in TORCH):
            problems.append(f"{imp.where()}: the {source_layer} layer never imports torch")
    return problems


def file_access(root: Path) -> list[str]:
    """Every file library imported and file function called in the NO_FILES layers."""
    problems = []
    for name, path in module_names(root).items():
        if layer_of(name) not in NO_FILES:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                targets = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                problems += [
                    f"{name}:{node.lineno} imports {t}" for t in targets if any(_is(t, lib) for lib in FILE_LIBRARIES)
                ]
            elif isinstance(node, ast.Call):
                func = node.func
                called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
                if called in FILE_CALLS:
                    problems.append(f"{name}:{node.lineno} calls {called}")
    return problems


def import_cycles(root: Path) -> list[str]:
    """A cycle among the module-level klstore imports, as 'a -> b -> a' (empty if none)."""
    internal = set(module_names(root))
    graph: dict[str, set[str]] = {m: set() for m in internal}
    for imp in collect_imports(root):
        if imp.module_level and imp.target in internal and imp.target != imp.source:
            graph[imp.source].add(imp.target)
    try:
        tuple(TopologicalSorter(graph).static_order())
    except CycleError as exc:
        return [" -> ".join(reversed(exc.args[1]))]
    return []


# ------------------------------------------------------------------ the package itself
def test_every_import_points_the_right_way():
    problems = wrong_arrows(PACKAGE)
    assert problems == [], "\n".join(problems)


def test_no_import_cycle():
    assert import_cycles(PACKAGE) == []


# The engine's steps in data-flow order (docs/architecture.md, "Where a change goes"): each may
# import the steps before it, none a step after it or the engine that composes them.
ENGINE_FLOW = ("runtime", "generation", "tracing", "sweeps", "readout", "engine")


def test_the_engine_steps_import_in_data_flow_order():
    flow = [f"klstore.core.{name}" for name in ENGINE_FLOW]
    assert set(flow) <= set(module_names(PACKAGE))
    imports = [imp for imp in collect_imports(PACKAGE) if imp.source in flow and imp.target in flow]
    assert ("klstore.core.engine", "klstore.core.readout") in {(imp.source, imp.target) for imp in imports}
    backwards = [imp.where() for imp in imports if flow.index(imp.target) >= flow.index(imp.source)]
    assert backwards == []


def test_class_names_are_unique_across_the_package():
    """Two classes of one name (three `Job`s once) make a reader open the wrong one."""
    where: dict[str, list[str]] = {}
    for name, path in module_names(PACKAGE).items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.ClassDef):
                where.setdefault(node.name, []).append(name)
    assert len(where) > 50
    assert {cls: modules for cls, modules in where.items() if len(modules) > 1} == {}


def test_the_ground_floor_touches_no_file():
    assert file_access(PACKAGE) == []


def test_the_walk_sees_the_imports_it_checks():
    """Guards the two tests above against passing on an empty walk."""
    imports = {(i.source, i.target, i.module_level) for i in collect_imports(PACKAGE)}
    assert ("klstore.run.runner", "ray", False) in imports  # inside a function
    assert ("klstore.run.worker", "klstore.core.engine", False) in imports
    assert ("klstore.demo", "klstore.run.runner", False) in imports  # from klstore.run import runner
    assert ("klstore.store.views", "klstore.store.tables", True) in imports
    assert ("klstore.spec.messages", "klstore.errors", True) in imports
    assert ("klstore.spec", "klstore.spec.compute", True) in imports
    assert ("klstore", "klstore.api", False) in imports  # importlib.import_module(_LAZY[name])
    assert layer_of("klstore.core.engine") == "core" and layer_of("klstore") == "package"
    assert layer_of("klstore.corelike") is None


# ------------------------------------------------------------------ the checker can fail
FAKE = {
    # a lazy table of API names is fine; the constant import_module at import time is not
    "__init__.py": """
        import importlib
        _LAZY = {"load": "klstore.cli"}
        importlib.import_module("klstore.errors")

        def __getattr__(name):
            return getattr(importlib.import_module(_LAZY[name]), name)
        """,
    "cli.py": "import klstore.run.runner\n",
    "errors.py": "",
    "spec.py": "from klstore.errors import KlstoreError\n",
    "store/__init__.py": "",
    # a cycle through a relative import, and torch inside a function of a torch-free layer
    "store/tables.py": "from klstore.store import views\n\ndef f():\n    import torch.nn\n",
    "store/views.py": "from . import tables\n",
    # a wrong arrow inside a function, through `from package import submodule`
    "core/__init__.py": "",
    "core/engine.py": "import torch\n\ndef g():\n    from klstore.run import worker\n",
    "run/__init__.py": "",
    "run/worker.py": "class W:\n    def __init__(self):\n        import ray\n",
    "run/runner.py": "import ray\nfrom klstore.core import engine\n",
    "extra.py": "",
}


@pytest.fixture
def fake_package(tmp_path):
    root = tmp_path / "klstore"
    for name, text in FAKE.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(textwrap.dedent(text).lstrip("\n"))
    return root


def test_checker_finds_wrong_arrows(fake_package):
    assert sorted(wrong_arrows(fake_package)) == sorted(
        [
            "klstore.extra: in no layer of the table",
            "klstore:3 imports klstore.errors: package may not import errors at import time",
            "klstore.store.tables:4 imports torch.nn: the store layer never imports torch",
            "klstore.core.engine:4 imports klstore.run.worker: core may not import run",
            "klstore.run.worker:3 imports ray: only klstore.run.runner may import ray",
        ]
    )


def test_checker_finds_file_access(fake_package):
    (fake_package / "spec.py").write_text(
        "import tempfile\nfrom pathlib import Path\n\ndef f(p):\n    return open(p), Path(p).exists(), Path(p)\n"
    )
    assert file_access(fake_package) == [
        "klstore.spec:1 imports tempfile",
        "klstore.spec:5 calls open",
        "klstore.spec:5 calls exists",
    ]


def test_checker_finds_cycles(fake_package):
    (cycle,) = import_cycles(fake_package)
    assert set(cycle.split(" -> ")) == {"klstore.store.tables", "klstore.store.views"}
    (fake_package / "store" / "views.py").write_text("def h():\n    from . import tables\n")
    assert import_cycles(fake_package) == []  # a function-level import runs later: no cycle


# ------------------------------------------------------------------ a fresh interpreter
LIGHT_SCRIPT = """
import json, sys
import klstore, klstore.errors, klstore.spec, klstore.config, klstore.output
import klstore.store, klstore.store.views, klstore.store.upkeep
import klstore.report, klstore.report.site, klstore.report.aggregate, klstore.cli
from klstore.config import load_config, load_report_spec, read_prompts
from klstore.store import open_store, views

config, prompts, store = sys.argv[1:4]
cfg = load_config(config)
load_report_spec(None)
open_store(store, create=True)
_, count = views.sql(store, "SELECT count(*) FROM kl WHERE model = ?", ["tiny"])
heavy = sorted({m.split(".")[0] for m in sys.modules} & {"torch", "transformers", "ray"})
print(json.dumps({"config": [p.id for p in cfg.prompts], "probes": [p.name for p in cfg.probes],
                  "file": [p.id for p in read_prompts(prompts)], "count": count[0][0],
                  "heavy": heavy}))
"""


def test_reading_configs_prompts_and_stores_loads_no_torch_or_ray(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"id": "a", "text": "one"}\n{"id": "b", "text": "two", "group": "g"}\n')
    config = tmp_path / "config.yaml"
    config.write_text(
        "name: light\nmodels: [smollm2-135m]\nprompts: [prompts.jsonl]\n"
        "probes: [logit_lens, {name: noise, scale: 0.5}]\nlayers: 0,-1\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", LIGHT_SCRIPT, str(config), str(prompts), str(tmp_path / "store")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {
        "config": ["a", "b"],
        "probes": ["logit_lens", "noise"],
        "file": ["a", "b"],
        "count": 0,
        "heavy": [],
    }
