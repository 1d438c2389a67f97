"""The module graph: no module imports one above it, no private name crosses a module, and the
config loads without the training stack.

The layers, lowest first. A module may import from the layers below its own and from its own
package (train.stage from train.merge); modules of one layer do not import each other.

  0  factlab (the package), errors, atomic (i11-input's atomic writers)
  1  methods      the table of training methods, torch-free (config validates against it)
  2  config       the typed experiment file
  3  evaluate     probes, the model interface (lm), scoring, generation, metrics, perplexity;
                  takes a model object, never loads one
  4  models, testing
                  model loading, layer-group targets (and i15-local's GGUF export, which
                  scores probes to check the export); tiny models for the tests
  5  data         reading, packing, synthesising and checking data (data.checks matches
                  leaked wording with evaluate.metrics' text normalisation); inside it,
                  data.templates (wordings) <- data.render (facts -> documents, Q&A, probes;
                  uses evaluate.probes' kind order) and data.writer <- data.synth, data.augment
  6  train        PEFT builders, the stage (prepare, fit, save), merging, regularizers
  7  experiment   the runner, evaluation of a run, sweeps, the run folder and the run store
  8  influence    i13-influence's influence studies (which train and score, like a run, and
                  write their run folder and store entry through experiment's run folder)
  9  report       tables, plots and reports of saved runs
 10  chat         i15-local's `factlab chat` (loads a run's model through experiment)
 11  cli_data     the `factlab data` commands
 12  cli          the `factlab` commands (adds cli_data's sub-app)
 13  __main__     `python -m factlab`

Imports inside functions and under TYPE_CHECKING count as well: a lazy import is still an
edge of the graph. And the graph has no cycle, inside one package either (experiment.runner
importing experiment.sweep while sweep imports runner in a function is a cycle).
"""

from __future__ import annotations

import ast
import graphlib
import json
import subprocess
import sys
from pathlib import Path

import factlab

PACKAGE = Path(factlab.__file__).parent

LAYERS: list[tuple[str, ...]] = [
    ("__init__", "errors", "atomic", "progress", "fingerprint"),
    ("methods",),
    ("config",),
    ("evaluate",),
    ("models", "testing"),
    ("data",),
    ("train",),
    ("experiment",),
    ("influence",),
    ("report",),
    ("chat",),
    ("cli_data",),
    ("cli",),
    ("__main__",),
]

# Edges that break the rules today and are being removed on other branches; delete each line
# once that branch is merged (the test then keeps them from coming back).
ALLOWED: set[tuple[str, str]] = set()

# Import edges that close a cycle today, left out of the cycle check until their branch removes
# them (delete the line then): tune_guard imports tune's checks lazily while tune imports
# tune_guard's preflight lazily (i23a; found by the cycle check when i22-orch merged main).
# Likewise train.edit imports train.stage's StageResult / check_fresh_model lazily while stage
# dispatches kind: edit to train.edit (i25).
ALLOWED_CYCLE_EDGES: set[tuple[str, str]] = {("factlab.experiment.tune_guard", "factlab.experiment.tune"),
                                             ("factlab.train.edit", "factlab.train.stage")}


def _unit(module: str) -> str:
    """The top-level unit of a dotted module name: factlab.train.stage -> train."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _layer(module: str) -> int:
    unit = _unit(module)
    for i, names in enumerate(LAYERS):
        if unit in names:
            return i
    raise AssertionError(f"{module} is in no layer of tests/test_layering.py; add its package to LAYERS")


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(rel.parts).removesuffix(".__init__")
        out[name] = path
    return out


def _imports(module: str, path: Path) -> list[tuple[str, str | None]]:
    """(imported factlab module, imported name or None) for every import in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[str, str | None]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, None) for a in node.names if a.name.startswith("factlab")]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the importing package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base.startswith("factlab"):
                found += [(base, a.name) for a in node.names]
    return found


def _violations() -> list[tuple[str, str, str]]:
    """(importing module, imported target, why) for every import that breaks the rules."""
    modules = _modules()
    bad = []
    for module, path in modules.items():
        for target, name in _imports(module, path):
            # `from factlab.models import targets` imports the module factlab.models.targets
            full = f"{target}.{name}" if name and f"{target}.{name}" in modules else target
            src_layer, dst_layer = _layer(module), _layer(full)
            if _unit(module) != _unit(full) and dst_layer >= src_layer:
                why = "same layer" if dst_layer == src_layer else "upward"
                bad.append((module, full, f"{why}: {_unit(module)} (layer {src_layer}) imports "
                                          f"{_unit(full)} (layer {dst_layer})"))
            if name and name.startswith("_") and not name.startswith("__") and full != module:
                bad.append((module, f"{full}.{name}", "private name from another module"))
            # attribute access on an imported module: T._TABLES
    for module, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("factlab"):
                for a in node.names:
                    if f"{node.module}.{a.name}" in modules:
                        aliases[a.asname or a.name] = f"{node.module}.{a.name}"
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith("factlab") and a.asname:
                        aliases[a.asname] = a.name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                bad.append((module, f"{aliases[node.value.id]}.{node.attr}", "private name from another module"))
    return bad


def _graph() -> dict[str, set[str]]:
    """Module -> the factlab modules it imports (at module level, in functions, under
    TYPE_CHECKING alike)."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        graph[module] = set()
        for target, name in _imports(module, path):
            full = f"{target}.{name}" if name and f"{target}.{name}" in modules else target
            if full != module:
                graph[module].add(full)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """An import cycle of `graph` (a -> b -> ... -> a), or None. graphlib's topological sort
    finds one when there is any."""
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as e:
        return list(e.args[1])
    return None


def test_no_import_cycle():
    graph = _graph()
    assert all(b in graph.get(a, ()) for a, b in ALLOWED_CYCLE_EDGES), "delete the edges gone from ALLOWED_CYCLE_EDGES"
    for a, b in ALLOWED_CYCLE_EDGES:
        graph[a].discard(b)
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_check_sees_a_cycle_through_a_lazy_import(tmp_path, monkeypatch):
    """The cycle rule can fail: within one package, a module-level import one way and an
    import inside a function the other way; a chain without the way back passes."""
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert set(_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}})) == {"a", "b", "c"}
    pkg = tmp_path / "factlab"
    for rel, text in {
        "__init__.py": "",
        "experiment/runner.py": "from factlab.experiment.sweep import SweepCache\n",
        "experiment/sweep.py": "class SweepCache: ...\n\ndef run():\n    from factlab.experiment.runner import go\n",
        "experiment/tune.py": "from factlab.experiment import runner\n",  # one way only: fine
    }.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(text)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", pkg)
    assert set(_cycle(_graph())) == {"factlab.experiment.runner", "factlab.experiment.sweep"}
    (pkg / "experiment/sweep.py").write_text("class SweepCache: ...\n")
    assert _cycle(_graph()) is None


def test_no_upward_import_and_no_private_name_across_modules():
    bad = [v for v in _violations() if (v[0], v[1]) not in ALLOWED]
    assert not bad, "\n".join(f"{m} -> {t}: {why}" for m, t, why in bad)


def test_the_allowed_exceptions_still_exist():
    """An exception that no longer occurs must be deleted from ALLOWED (it would let the
    import come back unnoticed)."""
    seen = {(m, t) for m, t, _ in _violations()}
    assert ALLOWED <= seen, f"delete from ALLOWED: {sorted(ALLOWED - seen)}"


def test_the_checker_sees_an_upward_and_a_private_import(tmp_path, monkeypatch):
    """The rules above can fail: a fake package with one bad import of each kind."""
    pkg = tmp_path / "factlab"
    for rel, text in {
        "__init__.py": "",
        "config.py": "from factlab.train.stage import run\n",  # upward, at module level
        "models/__init__.py": "",
        "models/targets.py": "def f():\n    from factlab.data import x\n",  # upward, lazy
        "evaluate/__init__.py": "",
        "data/__init__.py": "",
        "evaluate/scoring.py": "_pad = 1\n",
        "evaluate/generation.py": "from factlab.evaluate.scoring import _pad\n",  # private
        "train/__init__.py": "",
        "train/stage.py": "from factlab.train import merge\nfrom factlab.config import Experiment\n",  # fine
        "train/merge.py": "",
    }.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(text)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", pkg)
    found = {(m, t) for m, t, _ in _violations()}
    assert found == {("factlab.config", "factlab.train.stage"), ("factlab.models.targets", "factlab.data"),
                     ("factlab.evaluate.generation", "factlab.evaluate.scoring._pad")}


def test_importing_the_config_loads_no_training_stack():
    """config validates peft.method against factlab.methods, which must stay torch-free: the
    CLI parses and checks an experiment file before anything heavy is imported."""
    code = ("import json, sys\nimport factlab.config, factlab.methods\n"
            "factlab.config.PeftSpec(method='dora', dora=True)\n"  # runs the method validation
            "print(json.dumps(sorted(m for m in ('torch', 'transformers', 'peft', 'factlab.train') if m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []
