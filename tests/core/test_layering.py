"""Each fact written once, and layers that only look down: the core never imports a service,
no module imports another that (directly or not) imports it, a lower layer of the core never
imports a higher one, each subpackage imports only the layers it names and no framework, the
inference service loads no training, data-pipeline or evaluation code, settings are declared
in one module, URL schemes are told apart in one place, model names come from the registry,
and the services plug into the command line through entry points.

Imports are read from the source (ast), function-local ones included: an import moved into a
function to dodge a circle is still a circle. Only `if TYPE_CHECKING:` imports are left out
(they never run)."""

from __future__ import annotations

import ast
import functools
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from ctscan.models import architecture_names

REPO_ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted((REPO_ROOT / "ctscan").rglob("*.py")) + sorted((REPO_ROOT / "services").rglob("*.py"))
# Model names may be written only in the registry: not in the services, benchmarks or scripts either.
NAMED_MODELS_FORBIDDEN = [*SOURCES, *sorted((REPO_ROOT / "bench").rglob("*.py")),
                          *sorted((REPO_ROOT / "scripts").rglob("*.py"))]


@functools.cache  # each file is parsed once for all the rules
def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _where(path: Path, node: ast.AST) -> str:
    return f"{path.relative_to(REPO_ROOT)}:{getattr(node, 'lineno', '?')}"


def _docstrings(tree: ast.Module) -> set[int]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                found.add(id(first.value))
    return found


# The core's layers, lowest first: a module may import its own layer and those below it.
LAYERS: dict[str, tuple[str, ...]] = {
    "foundation": ("ctscan", "errors", "schemas", "metrics", "calibration"),
    "imaging": ("imaging", "imaging.decoding", "imaging.formats", "imaging.preprocessing", "imaging.screening",
                "imaging.perturbations"),
    "models": ("study", "models", "gate", "decision", "gradcam"),
    "settings": ("settings",),
    "storage": ("storage", "storage.objects", "storage.s3store", "storage.records", "storage.store",
                "storage.job_records", "release"),
    "access": ("access", "access.keys_and_accounts", "access.admin_credential", "access.audit_trail"),
    "data pipeline": ("data", "data.dataset", "data.versions", "data.download", "data.shortcut_audit"),
    "serving": ("serving", "serving.predictor", "serving.answers", "serving.onnx_runtime"),
    "training": ("training", "training.runs", "training.callbacks", "training.hyperparameters"),
    "publishing": ("publishing",),
    "evaluation": ("evaluation", "evaluation.reports", "evaluation.lesion_metrics", "evaluation.robustness",
                   "evaluation.safety"),
    "command line": ("cli", "cli_access"),
}
# A subpackage's own rule, narrower than its layer's: the layers of the core it may import
# besides its own package, and no web, queue or neural-network framework but those it is
# granted in SUBPACKAGE_FRAMEWORKS (function-local imports count). Imaging stands on the
# foundation alone: serving, training and the data pipeline share it, and the inference service
# decodes and crops without TensorFlow. Access needs no image or model code; storage needs
# neither. Data reads images and publishes versions to storage; its `tf.data` pipelines are the
# only reason it may load TensorFlow (never Keras: it builds no model), and a slice's source
# variant comes from imaging's perturbations. Training learns from the data pipeline with the
# models layer's networks and needs no storage or serving (a run's model becomes a version
# through publishing, a layer above); it may load TensorFlow and Keras. Evaluation measures what
# the layers below make (the models, served predictions, training's predictions, publishing's
# floors) on the data pipeline's splits; it needs no access code and loads no framework itself
# (the models layer loads TensorFlow for it). Serving predicts with the models layer's networks
# from imaging's slices and storage's versions; the data pipeline only for the real CT slices an
# ONNX copy is checked on (a function-local import, never at import: the inference service's
# sys.modules test below). It may load TensorFlow, Keras, tf2onnx (a copy is made when a version
# is saved) and ONNX Runtime, no web or queue framework: the HTTP is the services'.
FRAMEWORKS = ("tensorflow", "keras", "tf2onnx", "onnxruntime", "fastapi", "starlette", "flask", "werkzeug",
              "celery")
SUBPACKAGE_IMPORTS: dict[str, tuple[str, ...]] = {
    "imaging": ("foundation",),
    "storage": ("foundation", "settings"),
    "access": ("foundation", "settings", "storage"),
    "data": ("foundation", "imaging", "storage"),
    "training": ("foundation", "imaging", "models", "data pipeline"),
    "serving": ("foundation", "imaging", "models", "storage", "data pipeline"),
    "evaluation": ("foundation", "imaging", "models", "settings", "storage", "data pipeline", "serving", "training",
                   "publishing"),
}
SUBPACKAGE_FRAMEWORKS: dict[str, tuple[str, ...]] = {
    "data": ("tensorflow",),
    "training": ("tensorflow", "keras"),
    "serving": ("tensorflow", "keras", "tf2onnx", "onnxruntime"),
}
# What the inference service must not load on import (it serves; it neither trains nor evaluates):
# these modules and packages, and every module inside them.
NOT_IN_THE_INFERENCE_SERVICE = ("ctscan.data", "ctscan.training", "ctscan.evaluation", "ctscan.publishing",
                                "ctscan.cli", "tensorflow", "keras", "tf2onnx")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_nodes(tree: ast.Module) -> set[int]:
    return {id(inner) for node in ast.walk(tree)
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test) for inner in ast.walk(node)}


@functools.cache
def import_graph() -> dict[str, dict[str, str]]:
    """module -> {imported module of ctscan or services: where the import is written}."""
    modules = {_module_name(path): path for path in SOURCES}
    graph: dict[str, dict[str, str]] = {}
    for name, path in modules.items():
        tree = _tree(path)
        skipped = _type_checking_nodes(tree)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found: dict[str, str] = {}
        for node in ast.walk(tree):
            if id(node) in skipped:
                continue
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join([*package.split(".")[:len(package.split(".")) - node.level + 1],
                                     *([base] if base else [])])
                targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
            else:
                continue
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    found.setdefault(target, _where(path, node))
        graph[name] = found
    return graph


def _circles(graph: dict[str, dict[str, str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for target in graph[module]:
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for module in graph:
        if module not in index:
            visit(module)
    return circles


def test_no_module_imports_one_that_imports_it() -> None:
    graph = import_graph()
    circles = _circles(graph)
    where = [[graph[a][b] for a in circle for b in circle if b in graph[a]] for circle in circles]
    assert circles == [], where


def test_the_cores_layers_only_look_down() -> None:
    layer_of = {f"ctscan.{module}" if module != "ctscan" else "ctscan": rank
                for rank, modules in enumerate(LAYERS.values()) for module in modules}
    core = {name for name in import_graph() if name.split(".")[0] == "ctscan"}
    assert core == set(layer_of), "every core module has a layer (add new ones to LAYERS)"
    upward = [f"{where}: {module} ({list(LAYERS)[layer_of[module]]}) imports {target} "
              f"({list(LAYERS)[layer_of[target]]})"
              for module, targets in import_graph().items() if module in layer_of
              for target, where in targets.items() if target in layer_of and layer_of[target] > layer_of[module]]
    assert upward == []


def _third_party_imports(path: Path) -> dict[str, str]:
    tree = _tree(path)
    skipped = _type_checking_nodes(tree)
    found: dict[str, str] = {}
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else \
            [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
        for name in names:
            found.setdefault(name.split(".")[0], _where(path, node))
    return found


@pytest.mark.parametrize("subpackage", list(SUBPACKAGE_IMPORTS))
def test_each_subpackage_imports_only_the_layers_it_names(subpackage: str) -> None:
    package = f"ctscan.{subpackage}"
    allowed = {f"ctscan.{module}" if module != "ctscan" else "ctscan"
               for layer in SUBPACKAGE_IMPORTS[subpackage] for module in LAYERS[layer]}
    members = {name for name in import_graph() if name == package or name.startswith(f"{package}.")}
    assert members, f"{package} has no modules"
    core = [f"{where}: {module} imports {target}" for module in sorted(members)
            for target, where in import_graph()[module].items()
            if target.startswith("ctscan") and target not in members and target not in allowed]
    frameworks = [f"{where}: {path.relative_to(REPO_ROOT)} imports {name}"
                  for path in SOURCES if _module_name(path) in members
                  for name, where in _third_party_imports(path).items()
                  if name in FRAMEWORKS and name not in SUBPACKAGE_FRAMEWORKS.get(subpackage, ())]
    assert core + frameworks == []


def test_services_do_not_import_each_others_insides() -> None:
    """The inference service and the trainer import no other service; the web service talks to
    the trainer only through its client (services.trainer.api)."""
    allowed = {"services.web": {"services.trainer.api"}, "services.inference": set(), "services.trainer": set()}
    found = [f"{where}: {module} imports {target}" for module, targets in import_graph().items()
             for target, where in targets.items()
             if module.startswith("services.") and target.startswith("services.")
             and ".".join(target.split(".")[:2]) != ".".join(module.split(".")[:2])
             and target not in allowed.get(".".join(module.split(".")[:2]), set())]
    assert found == []


@pytest.mark.slow  # starts a Python process
def test_the_inference_service_loads_no_training_data_or_evaluation_code() -> None:
    import json
    import subprocess
    import sys

    code = "import json, sys; import services.inference.app; print(json.dumps(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False,
                          cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    loaded = set(json.loads(done.stdout.splitlines()[-1]))
    assert "services.inference.registry" in loaded and "ctscan.serving.predictor" in loaded
    assert sorted(name for name in loaded for banned in NOT_IN_THE_INFERENCE_SERVICE
                  if name == banned or name.startswith(f"{banned}.")) == []


def test_the_core_never_imports_a_service() -> None:
    offenders = []
    for path in sorted((REPO_ROOT / "ctscan").rglob("*.py")):
        for node in ast.walk(_tree(path)):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [_where(path, node) for name in names if name.split(".")[0] in ("services", "bench")]
    assert offenders == []


def test_settings_classes_live_in_one_module() -> None:
    declared = [_where(path, node) for path in SOURCES for node in ast.walk(_tree(path))
                if isinstance(node, ast.ClassDef)
                and any(getattr(base, "id", getattr(base, "attr", "")) in ("BaseSettings", "Section")
                        for base in node.bases)]
    assert declared and all(place.startswith("ctscan/settings.py:") for place in declared), declared


def test_only_the_object_store_layer_knows_url_schemes() -> None:
    allowed = {"ctscan/storage/objects.py", "ctscan/storage/s3store.py"}
    found = [_where(path, node) for path in SOURCES for node in ast.walk(_tree(path))
             if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("s3://")
             and str(path.relative_to(REPO_ROOT)) not in allowed and id(node) not in _docstrings(_tree(path))]
    # Help texts and messages may show an example URL; nothing may branch on one.
    branching = [place for place in found if "startswith" in _line(place)]
    assert branching == []


def _line(place: str) -> str:
    path, _, line = place.partition(":")
    return (REPO_ROOT / path).read_text().splitlines()[int(line) - 1]


def test_model_names_are_written_only_in_the_registry() -> None:
    names = set(architecture_names())
    found = []
    for path in NAMED_MODELS_FORBIDDEN:
        if path.relative_to(REPO_ROOT).as_posix() == "ctscan/models.py":
            continue
        tree = _tree(path)
        docstrings = _docstrings(tree)
        found += [_where(path, node) for node in ast.walk(tree)
                  if isinstance(node, ast.Constant) and node.value in names and id(node) not in docstrings]
    assert found == []


def test_services_plug_into_the_command_line_through_entry_points() -> None:
    services = {entry.name: entry.value for entry in entry_points(group="ctscan.services")}
    assert services == {"inference": "services.inference.main:cli_serve", "web": "services.web.main:cli_serve",
                        "worker": "services.trainer.main:cli_serve"}
    commands = {entry.name: entry.value for entry in entry_points(group="ctscan.commands")}
    assert commands == {"jobs": "services.trainer.cli:register"}
    from ctscan.cli import build_parser

    args = build_parser().parse_args(["serve", "worker", "--concurrency", "2"])
    assert (args.service, args.concurrency) == ("worker", 2)
    assert build_parser().parse_args(["jobs", "list"]).jobs_command == "list"


@pytest.mark.slow  # starts a Python process
def test_access_control_runs_in_every_image() -> None:
    """Keys, accounts and the audit trail are core: the inference and trainer images have no
    Flask or werkzeug, and their `ctscan` command builds its parser with these modules."""
    import subprocess
    import sys

    code = ("import sys; sys.modules.update(flask=None, werkzeug=None, flask_wtf=None); "
            "import ctscan.access.keys_and_accounts as keys, ctscan.access.audit_trail, ctscan.cli; "
            "ctscan.cli.build_parser(); h = keys.generate_password_hash('a-long-password-1'); "
            "assert keys.check_password_hash(h, 'a-long-password-1')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
