"""The package's import structure, read with `ast` alone (nothing is imported, no jax).

Every `import` / `from ... import` of `alit_jax` in a file counts, the ones inside functions
included: a lazy import only hides a cycle until the function runs.
"""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = "alit_jax"


def _module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(ROOT).with_suffix("").parts)
  if parts[-1] == "__init__":
    parts.pop()
  return ".".join(parts)


def _package_modules() -> dict[str, pathlib.Path]:
  """Dotted name -> file of every module under alit_jax/."""
  return {_module_name(p): p for p in sorted((ROOT / PACKAGE).rglob("*.py"))}


MODULES = _package_modules()


def _is_private(name: str) -> bool:
  return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
  """The absolute module a `from ... import` reads from (relative imports resolved)."""
  if not node.level:
    return node.module or ""
  base = module.split(".")
  base = base if is_package else base[:-1]
  base = base[: len(base) - (node.level - 1)]
  return ".".join(base + ([node.module] if node.module else []))


def _ours(name: str) -> bool:
  return name == PACKAGE or name.startswith(PACKAGE + ".")


def scan(path: pathlib.Path, module: str | None = None) -> tuple[set[str], list[str]]:
  """The alit_jax modules a file imports, and its uses of other modules' private names.

  A private name is used when it is imported (`from alit_jax.x import _f`) or read as an
  attribute of an imported alit_jax module (`x._f`, `alit_jax.x._f`).
  """
  tree = ast.parse(path.read_text(), str(path))
  is_package = path.name == "__init__.py"
  deps: set[str] = set()
  problems: list[str] = []
  aliases: dict[str, str] = {}  # local name -> the alit_jax module it is bound to
  where = lambda node: f"{path.relative_to(ROOT)}:{node.lineno}"  # noqa: E731
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for a in node.names:
        if not _ours(a.name):
          continue
        deps.add(a.name)
        if a.asname:
          aliases[a.asname] = a.name
        else:
          aliases[a.name.split(".")[0]] = a.name.split(".")[0]
    elif isinstance(node, ast.ImportFrom):
      source = _absolute(node, module or "", is_package) if module else (node.module or "")
      if not _ours(source):
        continue
      for a in node.names:
        full = f"{source}.{a.name}"
        if full in MODULES:  # a submodule
          deps.add(full)
          aliases[a.asname or a.name] = full
          if _is_private(a.name):
            problems.append(f"{where(node)}: imports private module {full}")
        else:
          deps.add(source)
          if _is_private(a.name):
            problems.append(f"{where(node)}: imports {a.name} from {source}")
  for node in ast.walk(tree):
    if not (isinstance(node, ast.Attribute) and _is_private(node.attr)):
      continue
    chain = []
    value = node.value
    while isinstance(value, ast.Attribute):
      chain.append(value.attr)
      value = value.value
    if isinstance(value, ast.Name) and value.id in aliases:
      target = ".".join([aliases[value.id], *reversed(chain)])
      if target in MODULES and target != module:
        problems.append(f"{where(node)}: uses {target}.{node.attr}")
  return deps, problems


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One cycle of the graph as a list of modules (first == last), or None."""
  state: dict[str, int] = {}  # 1: on the stack, 2: done
  stack: list[str] = []

  def visit(n: str) -> list[str] | None:
    state[n] = 1
    stack.append(n)
    for m in sorted(graph.get(n, ())):
      if state.get(m) == 1:
        return stack[stack.index(m) :] + [m]
      if m not in state:
        found = visit(m)
        if found:
          return found
    stack.pop()
    state[n] = 2
    return None

  for n in sorted(graph):
    if n not in state:
      found = visit(n)
      if found:
        return found
  return None


def test_package_imports_have_no_cycle_and_no_private_names():
  """The modules of alit_jax import each other without a cycle, and only public names.

  A cycle (trainer -> gan_stage -> trainer, say) means neither module can be read, tested or
  moved alone, and the import order decides whether it works at all. A private name imported
  from another module (`trainer._is_main`) is an interface nobody promised: renaming it in its
  own module breaks a module that the author did not know used it. (An import of an alit_jax
  module that does not exist fails here too.)
  """
  graph: dict[str, set[str]] = {}
  private: list[str] = []
  missing: list[str] = []
  for module, path in MODULES.items():
    deps, found = scan(path, module)
    graph[module] = {d for d in deps if d in MODULES and d != module}
    missing += [f"{module} imports {d}" for d in sorted(deps) if d not in MODULES]
    private += found
  cycle = _find_cycle(graph)
  failures = []
  if cycle:
    failures.append("import cycle: " + " -> ".join(cycle))
  if missing:
    failures.append("imports of alit_jax modules that do not exist:\n  " + "\n  ".join(missing))
  if private:
    failures.append("private names used across modules:\n  " + "\n  ".join(private))
  assert not failures, "\n".join(failures)


def test_tests_and_experiments_use_only_public_names():
  """Tests and experiments import only public names of alit_jax.

  A test that imports `_helper` pins an implementation detail: a refactor that keeps the
  behaviour but renames the helper fails the test, and the test no longer shows how the package
  is meant to be used.
  """
  files = sorted((ROOT / "tests").rglob("*.py")) + sorted((ROOT / "experiments").rglob("*.py"))
  problems = [p for f in files for p in scan(f)[1]]
  assert not problems, "private alit_jax names used:\n" + "\n".join(problems)


MAX_MODULE_LINES = 700
MAX_FUNCTION_LINES = 120


def _function_lengths(tree: ast.AST):
  """(name, first line, lines not counting the docstring) of every function in `tree`."""
  for node in ast.walk(tree):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      n = node.end_lineno - node.lineno + 1
      if ast.get_docstring(node) is not None:
        doc = node.body[0]
        n -= doc.end_lineno - doc.lineno + 1
      yield node.name, node.lineno, n


def test_modules_and_functions_fit_on_a_screen_or_two():
  """Every alit_jax module has <= 700 lines and every function <= 120 (docstring not counted).

  A 1000-line module or a 250-line function is read whole before it can be changed safely; the
  limits (issue 17) keep each piece small enough to review, test and move on its own. A module
  or function that grows past them fails here with its name and size.
  """
  long_modules, long_functions = [], []
  for path in MODULES.values():
    src = path.read_text()
    rel = path.relative_to(ROOT)
    if src.count("\n") > MAX_MODULE_LINES:
      long_modules.append(f"{rel}: {src.count(chr(10))} lines")
    for name, line, n in _function_lengths(ast.parse(src)):
      if n > MAX_FUNCTION_LINES:
        long_functions.append(f"{rel}:{line} {name}: {n} lines")
  failures = []
  if long_modules:
    failures.append(f"modules over {MAX_MODULE_LINES} lines:\n  " + "\n  ".join(long_modules))
  if long_functions:
    failures.append(
      f"functions over {MAX_FUNCTION_LINES} lines (docstring not counted):\n  "
      + "\n  ".join(long_functions)
    )
  assert not failures, "\n".join(failures)
