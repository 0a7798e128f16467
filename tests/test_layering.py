"""The package's layers, bottom to top, and the rule that no module imports a layer above its own
(function-level imports included): config and ops; model, data and checkpoint; parallel; train; hf
and analysis; the command line (with plan and sweep).  Written as an independent check of the
README's Layout section."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = [
    {"megamix.errors", "megamix.schemes", "megamix.config", "megamix.ops"},
    {"megamix.model", "megamix.data", "megamix.checkpoint"},
    {"megamix.parallel"},
    {"megamix.train"},
    {"megamix.hf", "megamix.analysis"},
    {"megamix.cli", "megamix.plan", "megamix.sweep", "megamix.__main__", "megamix"},
]


def layer_of(module: str) -> int:
    parts = module.split(".")
    for depth in (2, 1):
        name = ".".join(parts[:depth])
        for level, members in enumerate(LAYERS):
            if name in members:
                return level
    raise AssertionError(f"{module} belongs to no layer; add it to LAYERS")


def imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return {name for name in found if name == "megamix" or name.startswith("megamix.")}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_no_module_imports_a_layer_above_its_own():
    violations = []
    for path in sorted((ROOT / "megamix").rglob("*.py")):
        if path.name == "modeling_megamix.py":  # shipped inside exports: it imports no megamix at all
            assert not imports(path)
            continue
        module = module_name(path)
        for imported in imports(path):
            if imported != "megamix" and layer_of(imported) > layer_of(module):
                violations.append(f"{module} imports {imported}")
    assert not violations, "\n".join(violations)


def test_the_trainer_names_no_engine_mesh_or_schedule():
    source = (ROOT / "megamix" / "train" / "trainer.py").read_text()
    for word in ("mesh", "DeepSpeed", "deepspeed", "PipelineEngine", "PlainEngine", "pipeline", "fsdp", "FSDP"):
        assert word not in source, word
    tree = ast.parse(source)
    run = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "run")
    assert run.end_lineno - run.lineno + 1 <= 60
