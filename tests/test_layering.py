"""The import rules that keep the folders apart: service and training use models, models
imports neither; core imports nothing above it (the networks register themselves); networks
and engines never import each other; training and service know no network by name."""

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def imported(path: Path) -> set[str]:
    """Absolute module names a file imports (relative imports resolved against its package)."""
    package = path.relative_to(ROOT).with_suffix("").parts[:-1]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else ()
            module = ".".join([*base, *([node.module] if node.module else [])])
            names |= {module} | {f"{module}.{a.name}" for a in node.names}
    return names


RULES = [  # folder, module prefixes none of its files may import
    ("models", ("service", "training", "bench")),
    ("models/core", ("models.networks", "models.engines", "models.acs")),
    ("models/acs", ("models.networks", "models.engines")),
    ("models/engines", ("models.networks", "models.acs")),
    ("models/networks", ("models.engines",)),
    ("training", ("service", "models.networks")),
    ("service", ("training", "models.networks")),
]


@pytest.mark.parametrize(("folder", "forbidden"), RULES, ids=[r[0] for r in RULES])
def test_folder_imports_stay_in_their_layer(folder, forbidden):
    broken = sorted(f"{path.relative_to(ROOT)}: {name}"
                    for path in (ROOT / folder).rglob("*.py") for name in imported(path)
                    if name.split(".")[0] != "__future__"
                    and any(name == f or name.startswith(f + ".") for f in forbidden))
    assert not broken, broken


def test_the_rules_catch_an_upward_import(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    core = tmp_path / "models" / "core"
    core.mkdir(parents=True)
    (core / "registry.py").write_text("from ..networks import fastnet\nimport torch\n")
    assert "models.networks.fastnet" in imported(core / "registry.py")
    with pytest.raises(AssertionError):
        test_folder_imports_stay_in_their_layer("models/core", RULES[1][1])
