"""Imports: every module imports on its own from anywhere (the installed packages, no sys.path
edits), and the dependency directions stay one way (tokenizer below weights, evaluate below
analysis, rollouts below the trainer, evaluate and analysis)."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# The sandbox puts package directories on its own interpreter's path; its tests mirror that.
SYS_PATH_ALLOWED = {"mopd_jax/verifiers/sandbox.py", "tests/test_code_sandbox.py"}

# Each module in a child forked from a process that loaded only third-party packages: fresh
# for mopd_jax / configs, so an import that works only after another module was imported fails
# here; the fork spares each child the ~2 s of importing jax again.
_IMPORT_EACH = r"""
import importlib, importlib.util, json, os, sys, traceback
for heavy in ("jax", "jax.numpy", "numpy", "flax.nnx", "optax", "orbax.checkpoint", "ml_collections", "jinja2"):
  try:
    importlib.import_module(heavy)
  except ImportError:
    pass
ours = ("mopd_jax", "configs", "experiments")
assert not [m for m in sys.modules if m.split(".")[0] in ours], "a third-party import loaded our modules"
origins = {p: importlib.util.find_spec(p).origin for p in ours}
failed = {}
for name in sys.argv[1:]:
  read, write = os.pipe()
  pid = os.fork()
  if pid == 0:
    os.close(read)
    try:
      importlib.import_module(name)
      os._exit(0)
    except BaseException:
      os.write(write, traceback.format_exc()[-3000:].encode())
      os._exit(1)
  os.close(write)
  with os.fdopen(read) as f:
    error = f.read()
  if os.waitpid(pid, 0)[1] != 0:
    failed[name] = error or "died"
print(json.dumps({"origins": origins, "failed": failed}))
"""


def _modules(package: str) -> dict[str, Path]:
  """The package's modules by dotted name, from its files."""
  out = {}
  for path in sorted((REPO / package).rglob("*.py")):
    parts = path.relative_to(REPO).with_suffix("").parts
    out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
  return out


def _imports(path: Path, module: str) -> set[str]:
  """Every module an `import` / `from` statement in the file names, at any depth (function
  bodies too), with the packages each one implies (importing a.b.c runs a and a.b first)."""
  package = module if path.name == "__init__.py" else module.rpartition(".")[0]
  names = set()
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      names.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        anchor = package.split(".")[:len(package.split(".")) - (node.level - 1)]
        base = ".".join(anchor + ([base] if base else []))
      names.add(base)
      names.update(f"{base}.{a.name}" for a in node.names)  # `from pkg import submodule`
  implied = set()
  for name in names:
    parts = name.split(".")
    implied.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
  return implied


def _graph() -> dict[str, set[str]]:
  modules = _modules("mopd_jax")
  return {m: _imports(path, m) & set(modules) - {m} for m, path in modules.items()}


def _reaches(graph: dict[str, set[str]], start: str, targets: set[str]) -> list[str]:
  """An import path from `start` into `targets`, or []."""
  seen, stack = {start}, [[start]]
  while stack:
    path = stack.pop()
    for nxt in sorted(graph.get(path[-1], ())):
      if nxt in targets:
        return path + [nxt]
      if nxt not in seen:
        seen.add(nxt)
        stack.append(path + [nxt])
  return []


def _group(graph: dict[str, set[str]], package: str) -> set[str]:
  return {m for m in graph if m == package or m.startswith(package + ".")}


def test_the_import_graph_walk_sees_imports_inside_functions():
  graph = _graph()
  assert "mopd_jax.trainer" in graph["mopd_jax.main"]  # imported inside _main
  assert {"mopd_jax.weights.gguf", "mopd_jax.tokenizer"} <= graph["mopd_jax.weights"]


@pytest.mark.parametrize("upper, lower, user", [
    # weights -> tokenizer (a GGUF file's tokenizer is the tokenizer module's), never back.
    ("mopd_jax.weights", "mopd_jax.tokenizer", "mopd_jax.weights"),
    # analysis -> evaluate (the teacher-signal analysis reads evaluation rollouts), never back.
    ("mopd_jax.analysis", "mopd_jax.evaluate", "mopd_jax.analysis.teacher_signal"),
])
def test_imports_go_one_way(upper, lower, user):
  graph = _graph()
  assert _reaches(graph, user, {lower})
  back = _reaches(graph, lower, _group(graph, upper))
  assert not back, " -> ".join(back)


def test_rollouts_sit_below_the_trainer_evaluation_and_analysis():
  """trainer, evaluate and analysis -> rollouts (one rollout-group record), never back."""
  graph = _graph()
  above = {"mopd_jax.trainer", "mopd_jax.evaluate"} | _group(graph, "mopd_jax.analysis")
  for user in ("mopd_jax.trainer", "mopd_jax.evaluate", "mopd_jax.analysis.teacher_signal"):
    assert "mopd_jax.rollouts" in graph[user], user
  back = _reaches(graph, "mopd_jax.rollouts", above)
  assert not back, " -> ".join(back)


def test_evaluate_leaves_the_checkpoint_layout_to_checkpointing():
  source = (REPO / "mopd_jax" / "evaluate.py").read_text()
  assert "orbax.checkpoint" not in _imports(REPO / "mopd_jax" / "evaluate.py", "mopd_jax.evaluate")
  for layout in ("_CHECKPOINT_METADATA", '"arrays"', "Checkpointer("):
    assert layout not in source, layout


def _sys_path_edits(path: Path) -> list[int]:
  lines = []
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
        and node.func.attr in ("insert", "append", "extend")
        and isinstance(node.func.value, ast.Attribute) and node.func.value.attr == "path"
        and isinstance(node.func.value.value, ast.Name) and node.func.value.value.id == "sys"):
      lines.append(node.lineno)
  return lines


def test_no_sys_path_edits():
  edits = {}
  for folder in ("mopd_jax", "configs", "experiments", "tests"):
    for path in sorted((REPO / folder).rglob("*.py")):
      rel = path.relative_to(REPO).as_posix()
      lines = [] if rel in SYS_PATH_ALLOWED else _sys_path_edits(path)
      if lines:
        edits[rel] = lines
  assert edits == {}, f"sys.path edits (import through the installed packages instead): {edits}"


def test_every_module_imports_alone_from_outside_the_repo(tmp_path):
  modules = [*_modules("mopd_jax"), *_modules("configs"),  # and the experiments other experiments import
             "experiments.bench_train_step", "experiments.profile_summary", "experiments.stress_sandbox"]
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  out = subprocess.run([sys.executable, "-c", _IMPORT_EACH, *modules], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  for package, origin in result["origins"].items():
    if not origin or not Path(origin).resolve().is_relative_to(REPO):
      pytest.skip(f"the installed {package} ({origin}) is not this checkout: pip install --no-deps -e {REPO}")
  assert result["failed"] == {}, "\n".join(f"{m}:\n{e}" for m, e in result["failed"].items())


def _layers() -> dict[str, int]:
  """DEVELOPERS.md's layer table: module path below mopd_jax (`tasks`, or `tasks.loading` for a
  module placed apart from its package) -> its layer (0 = lowest)."""
  table = (REPO / "DEVELOPERS.md").read_text().split("## Layers", 1)[1].split("\n## ", 1)[0]
  out, layer = {}, -1
  for line in table.splitlines():
    if not line.startswith("    ") or not line.strip():
      continue
    if not line.startswith("      "):  # a deeper indent continues the layer above
      layer += 1
    names = line.strip().split("   ")[0]  # the module list, before the description column
    out.update((n.strip(), layer) for n in names.split(",") if n.strip())
  return out


def _layer_of(module: str, layers: dict[str, int]) -> tuple[str, int]:
  """(table entry, layer) of a module: its longest dotted prefix in the table."""
  parts = module.split(".")[1:]
  for n in range(len(parts), 0, -1):
    name = ".".join(parts[:n])
    if name in layers:
      return name, layers[name]
  return parts[0], -1


def test_the_layers_in_developers_md_hold():
  """Every module of mopd_jax is in DEVELOPERS.md's layer table, and none imports a module of a
  higher layer (at any depth, function bodies too)."""
  layers, graph = _layers(), _graph()
  modules = [m for m in graph if m != "mopd_jax"]
  missing = sorted({_layer_of(m, layers)[0] for m in modules if _layer_of(m, layers)[1] < 0})
  assert not missing, f"add {missing} to the layer table in DEVELOPERS.md"
  upward = sorted(f"{m} -> {d}" for m in modules for d in graph[m] if d != "mopd_jax"
                  and _layer_of(d, layers)[1] > _layer_of(m, layers)[1])
  assert not upward, f"imports from a higher layer: {upward}"
