"""The report pipeline runs one way (docs/architecture.md, the `report/` row), checked on the source:

- the modules of klstore/report/ import only modules of their own stage or an earlier one, in
  the stages below (the order docs/architecture.md names them in), so the data builders import
  no presentation code;
- no module imports a private name (`_x`) of another klstore module, nor reaches one as
  `module._x`;
- a `Grid` cannot be changed once built, and a `Figure` is made from a grid without writing
  into it.

The checkers run on fake packages too, so that each can fail.
"""

from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest

from klstore.report import figure, floor
from klstore.report.grid import Grid
from klstore.spec import parse_report_spec

REPO = Path(__file__).resolve().parents[2]
REPORT = REPO / "klstore" / "report"

# Stages in data-flow order. Stage 0 reads the store into grids (the data builders and their
# value); scale and floor judge a grid; figure holds a grid with those judgements; observe
# writes its sentences; then drawing; the site last.
STAGES = (
    ("intervals", "grid", "compare", "aggregate", "settling", "prompts", "lenses"),
    ("scale", "floor"),
    ("figure",),
    ("observe",),
    ("plotting", "lineplot", "drawing", "interactive"),
    ("site",),
)
DATA = STAGES[0]
PRESENTATION = ("plotting", "lineplot", "drawing", "interactive", "site")


def stage_of(name: str) -> int:
    return next(i for i, stage in enumerate(STAGES) if name in stage)


def _report_imports(path: Path, package: str) -> list[tuple[str, int]]:
    """(report module imported, line) for every import of a module of `package` in the file,
    at any level (`from package import x`, `from package.x import y`, `import package.x`, `from .x import y`)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:  # relative: inside the package
                module = f"{package}.{module}".rstrip(".")
            if module == package:
                found += [(alias.name, node.lineno) for alias in node.names]
            elif module.startswith(package + "."):
                found.append((module.split(".")[len(package.split("."))], node.lineno))
        elif isinstance(node, ast.Import):
            found += [
                (alias.name.split(".")[len(package.split("."))], node.lineno)
                for alias in node.names
                if alias.name.startswith(package + ".")
            ]
    return found


def wrong_way(folder: Path, package: str = "klstore.report") -> list[str]:
    """Imports that point to a later stage, or to a module the stages do not name."""
    problems = []
    for path in sorted(folder.glob("*.py")):
        if path.stem == "__init__":
            continue
        if not any(path.stem in stage for stage in STAGES):
            problems.append(f"{path.name}: not in STAGES (add it, and to docs/architecture.md)")
            continue
        for target, line in _report_imports(path, package):
            if not any(target in stage for stage in STAGES):
                problems.append(f"{path.name}:{line} imports {target}, which is in no stage")
            elif path.stem in DATA and target in PRESENTATION:
                problems.append(f"{path.name}:{line}: a data builder imports presentation code ({target})")
            elif stage_of(target) > stage_of(path.stem):
                problems.append(f"{path.name}:{line} imports {target}, a later stage")
    return problems


def private_reaches(folder: Path, package: str = "klstore") -> list[str]:
    """`from <package>... import _x`, `from .x import _x` and `module._x` where `module` was imported
    from the package, in every module under `folder`."""
    problems = []
    for path in sorted(folder.rglob("*.py")):
        tree = ast.parse(path.read_text())
        modules = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith(package)):
                for alias in node.names:
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        problems.append(f"{path.name}:{node.lineno} imports {alias.name} from {node.module}")
                    modules.add(alias.asname or alias.name)
            elif isinstance(node, ast.Import):
                modules |= {alias.asname for alias in node.names if alias.name.startswith(package) and alias.asname}
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in modules
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
            ):
                problems.append(f"{path.name}:{node.lineno} reaches {node.value.id}.{node.attr}")
    return problems


def test_every_report_import_points_down_the_pipeline():
    assert wrong_way(REPORT) == []


def test_no_private_name_crosses_a_module_of_the_report():
    assert private_reaches(REPORT) == []


def test_architecture_names_the_report_modules_in_stage_order():
    """docs/architecture.md's `report/` row names every module, and in an order that never goes
    back a stage."""
    text = (REPO / "docs" / "architecture.md").read_text()
    block = re.search(r"^report/.*?(?=^\S)", text, re.S | re.M).group(0)
    named = [m for m in re.findall(r"[a-z_]+", block) if any(m in stage for stage in STAGES)]
    first = list(dict.fromkeys(named))
    assert sorted(first) == sorted(m for stage in STAGES for m in stage)
    order = [stage_of(m) for m in first]
    assert order == sorted(order), first


FAKE = {
    "grid.py": "import numpy as np\n",
    "aggregate.py": "from klstore.report.grid import Grid\n\ndef f():\n    from klstore.report import plotting\n",
    "prompts.py": "from klstore.report.aggregate import _slug\nfrom klstore.report import aggregate\n\n"
    "def g():\n    return aggregate._n_layers\n",
    "scale.py": "from .figure import Figure\n",
    "figure.py": "",
    "plotting.py": "",
    "extra.py": "",
}


def test_the_checkers_find_wrong_arrows_and_private_names(tmp_path):
    for name, source in FAKE.items():
        (tmp_path / name).write_text(source)
    assert wrong_way(tmp_path) == [
        "aggregate.py:4: a data builder imports presentation code (plotting)",
        "extra.py: not in STAGES (add it, and to docs/architecture.md)",
        "scale.py:1 imports figure, a later stage",
    ]
    assert private_reaches(tmp_path) == [
        "prompts.py:1 imports _slug from klstore.report.aggregate",
        "prompts.py:5 reaches aggregate._n_layers",
    ]


# ------------------------------------------------------------------ immutable values
def _grid() -> Grid:
    values = np.array([[1.0, 2e-7], [np.nan, 3.0]])
    return Grid(
        "g",
        "s",
        "t",
        (0, 1),
        ("Gen0", "Gen1"),
        values,
        np.ones((2, 2), int),
        1,
        "kl",
        "aggregate",
        {"model": "m", "probe": "p"},
        inputs=(("m", "p"),),
        hover={"mean": values.copy(), "aggregate": "mean"},
    )


def test_a_grid_cannot_be_changed():
    grid = _grid()
    with pytest.raises(dataclasses.FrozenInstanceError):
        grid.values = np.zeros((2, 2))  # type: ignore[misc]
    for array in (grid.values, grid.counts, grid.hover["mean"]):
        with pytest.raises(ValueError, match="read-only"):
            array[0, 0] = 5.0
    with pytest.raises(TypeError):
        grid.labels["model"] = "other"  # type: ignore[index]
    with pytest.raises(TypeError):
        grid.hover["mean"] = None  # type: ignore[index]
    settled = grid.with_settling({"n_tokens": 2})
    assert settled is not grid and grid.settling is None and settled.settling == {"n_tokens": 2}
    assert settled.values is grid.values and dict(settled.labels) == dict(grid.labels)


def test_a_figure_is_made_from_a_grid_without_writing_into_it():
    grid = _grid()
    before = {f.name: getattr(grid, f.name) for f in dataclasses.fields(grid)}
    spec = parse_report_spec({"name": "t", "color_scale": "linear"})
    shown = figure.frame(grid, spec, floor.Floors({("m", "r"): 1e-6}))
    assert shown.grid is grid and {f.name: getattr(grid, f.name) for f in dataclasses.fields(grid)} == before
    assert (shown.scale.lo, shown.scale.hi) == (2e-7, 3.0) and shown.noise_floor == 1e-6
    assert shown.below_floor.tolist() == [[False, True], [False, False]] and not shown.below_floor.flags.writeable
    observed = shown.with_observations(["one"])
    assert observed.observations == ("one",) and shown.observations == () and observed.grid is grid
    with pytest.raises(dataclasses.FrozenInstanceError):
        shown.noise_floor = 1.0  # type: ignore[misc]
