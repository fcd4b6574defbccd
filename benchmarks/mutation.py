"""Mutation testing: how many deliberately planted bugs the tests catch.

Two parts:

* **Family folders** (samplers/, guidance/, caching/, highres/, regional/, utils/; proving/ on request):
  Cosmic Ray (``pip install -e '.[mutation]'``) mutates one module at a time and runs only the unit test files
  that import it, directly or through other modules (found from the import statements, so no mapping to keep).
  Each module's unmutated tests run first (the baseline); a mutant gets ``max(--min-timeout, --timeout-factor x
  baseline)`` seconds, and one that runs past it counts as detected (timeout). By default each mutant's tests
  run in a process forked from this one after torch and pytest are imported, and only the tests that can see
  the mutant: a coverage run of the unmutated module records which test bodies run each statement; a mutant
  runs those tests (every test when its statement runs at import, in a fixture or in a cached function, or
  when a conftest imports the module; none when no test reaches it: a survivor without a run), ordered by each
  test's time over the number of the module's earlier mutants it failed first on (plus a small prior): quick
  tests that kill often first.
  Tests left out can only be ones that never run the mutated code, or that reuse something another test
  computed, so the selection may miss a kill but never invents one. ``--runner subprocess --all-tests``
  runs each mutant as Cosmic Ray itself does.
* **Glue** (nodes/, which needs a real ComfyUI): the named behavioural defects of
  ``benchmarks/mutation_defects.toml``, each a one-place text substitution in a node file, checked against the
  host test files the entry names. A substitution whose old text is not found exactly once stops the command,
  so the list cannot go stale unnoticed. Without a ComfyUI checkout this part is skipped with the reason.

Everything runs on a copy of the pack (in ``--work-dir``), never on the checkout, with the copy first on
``PYTHONPATH`` (checked before anything runs). Sessions are kept there per module and reused while the module,
its test files and everything they import are unchanged, so an interrupted or ``--max-mutants``-limited run
goes on where it stopped.

Survivors are looked up in ``benchmarks/mutation_equivalents.toml`` (reviewed reasons): "equivalent: ..."
survivors are left out of the kill rate, "untested: ..." ones count against it.

Run (slow, not part of the test command; one worker, one thread):

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/mutation.py --folder regional --folder utils
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/mutation.py --module guidance/pag_layers.py  # one module
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/mutation.py --glue
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/mutation.py --estimate   # mutant counts + time estimate
    .venv/bin/python benchmarks/mutation.py --report                       # re-render after editing reasons
    # after adding tests for a module's survivors: run only those survivors again (killed ones stay killed)
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/mutation.py --module samplers/dc_solver.py --retest-survivors
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/mutation.py              # everything (hours)

writes benchmarks/results/mutation.{json,md}; folders not run this time keep their earlier results, and so do the
modules of a folder that a ``--module`` run left out.
"""

from __future__ import annotations

import argparse
import ast
import datetime as dt
import hashlib
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
REASONS_FILE = ROOT / "benchmarks" / "mutation_equivalents.toml"
DEFECTS_FILE = ROOT / "benchmarks" / "mutation_defects.toml"
PACKAGE = "preprint"
FAMILIES = ("samplers", "guidance", "caching", "highres", "regional", "utils")
OPTIONAL_FAMILIES = ("proving",)
UNIT_TESTS = "tests/unit"

# One or two natural mutants per site rather than every operator pair: arithmetic swapped with its inverse,
# comparison boundaries moved, conditions negated, constants moved by one, loops emptied, decorators and
# exception handlers removed. Cosmic Ray's operator names, as `cosmic-ray operators` lists them.
OPERATORS = (
    "core/ReplaceBinaryOperator_Add_Sub", "core/ReplaceBinaryOperator_Sub_Add",
    "core/ReplaceBinaryOperator_Mul_Div", "core/ReplaceBinaryOperator_Div_Mul",
    "core/ReplaceBinaryOperator_FloorDiv_Div", "core/ReplaceBinaryOperator_Mod_FloorDiv",
    "core/ReplaceBinaryOperator_Pow_Mul",
    "core/ReplaceBinaryOperator_BitAnd_BitOr", "core/ReplaceBinaryOperator_BitOr_BitAnd",
    "core/ReplaceBinaryOperator_BitXor_BitOr",
    "core/ReplaceBinaryOperator_LShift_RShift", "core/ReplaceBinaryOperator_RShift_LShift",
    "core/ReplaceComparisonOperator_Eq_NotEq", "core/ReplaceComparisonOperator_NotEq_Eq",
    "core/ReplaceComparisonOperator_Lt_LtE", "core/ReplaceComparisonOperator_LtE_Lt",
    "core/ReplaceComparisonOperator_Gt_GtE", "core/ReplaceComparisonOperator_GtE_Gt",
    "core/ReplaceComparisonOperator_Is_IsNot", "core/ReplaceComparisonOperator_IsNot_Is",
    "core/ReplaceUnaryOperator_Delete_USub", "core/ReplaceUnaryOperator_Delete_Not",
    "core/ReplaceUnaryOperator_Delete_Invert",
    "core/AddNot", "core/ReplaceTrueWithFalse", "core/ReplaceFalseWithTrue",
    "core/ReplaceAndWithOr", "core/ReplaceOrWithAnd",
    "core/ReplaceBreakWithContinue", "core/ReplaceContinueWithBreak",
    "core/ExceptionReplacer", "core/NumberReplacer", "core/RemoveDecorator", "core/ZeroIterationForLoop",
)
LOG_METHODS = {"debug", "info", "warning", "error", "exception", "critical"}
LOG_OBJECTS = {"log", "logger", "logging"}
FILTERS = (
    "type annotations (no run-time effect under `from __future__ import annotations`)",
    "arguments of logging calls (`log.info(...)` and the like)",
    "the arguments of the exception raised by a `raise` statement (message text)",
    "lines marked `# pragma: no mutate`",
)
FILTERED_POSITION = "filtered: position"
NO_TESTS = "no unit test file imports this module"
SETTINGS_VERSION = "1"  # bump when OPERATORS or the filters change: stored sessions are then rebuilt


def log_line(msg: str) -> None:
    print(msg, flush=True)


# ------------------------------------------------------------------------------------------------ the copy

def copy_tree(work_dir: Path) -> Path:
    """A fresh copy of the pack at ``work_dir/tree/preprint`` (sources, tests, weights; no caches or results)."""
    dest = work_dir / "tree" / PACKAGE
    if dest.exists():
        shutil.rmtree(dest)
    ignore = shutil.ignore_patterns(".git", ".venv", "build", "output", "__pycache__", ".pytest_cache",
                                    ".ruff_cache", "*.egg-info", ".pytest_tiers.json", "*.png")

    def ignore_here(src, names):
        skipped = set(ignore(src, names))
        if Path(src).resolve() == (ROOT / "benchmarks").resolve():
            skipped.add("results")
        if Path(src).resolve() == ROOT:
            skipped.update(n for n in names if n.startswith("."))
        return skipped

    shutil.copytree(ROOT, dest, ignore=ignore_here, symlinks=True)
    return dest


def test_env(tree: Path, work_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(tree.parent), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env["PREPRINT_TIER_SUMMARY"] = str(work_dir / "tiers.json")
    # the unit tests' exact reference solutions, kept between the test processes of the mutants (keyed by the
    # source of the mixture code, so a mutant of that code recomputes them)
    env["PREPRINT_REFERENCE_CACHE"] = str(work_dir / "references")
    return env


def check_import_redirect(tree: Path, env: dict[str, str]) -> None:
    out = subprocess.run([sys.executable, "-c", f"import {PACKAGE}; print({PACKAGE}.__file__)"], env=env,
                         cwd=tree, capture_output=True, text=True, check=True).stdout.strip()
    if Path(out).resolve().parent != tree.resolve():
        sys.exit(f"the test processes import {PACKAGE} from {out}, not from the mutation copy {tree}; "
                 "a mutation run would test the wrong code.")


def pytest_args(tests: list[str]) -> list[str]:
    """pytest's arguments for one mutant's tests (files or node ids): stop at the first failure, short output."""
    return ["-x", "-q", "--no-header", "--tb=line", "-p", "no:cacheprovider", "-o", "addopts=", *tests]


def pytest_command(tests: list[str]) -> list[str]:
    return [sys.executable, "-m", "pytest", *pytest_args(tests)]


# ------------------------------------------------------------------------------------------------ imports

def module_name(path: Path, tree: Path) -> str:
    parts = [PACKAGE, *path.relative_to(tree).with_suffix("").parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _adder(files: dict, found: set[str]):
    """Record an imported name as the innermost module of the copy it names (``a.b.func`` -> ``a.b``)."""
    def add(target: str) -> None:
        while target:
            if target in files:
                found.add(target)
                return
            target = target.rpartition(".")[0]
    return add


def import_graph(tree: Path) -> dict[str, tuple[Path, set[str]]]:
    """Every module of the copy (tests included): its file and the copy's modules it imports."""
    files = {module_name(p, tree): p for p in tree.rglob("*.py") if "benchmarks" not in p.relative_to(tree).parts}
    graph = {}
    for name, path in files.items():
        is_pkg = path.name == "__init__.py"
        found: set[str] = set()
        add = _adder(files, found)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    add(alias.name)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_pkg else name.split(".")[:-1]
                    base = base[:len(base) - (node.level - 1)]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                add(module)
                for alias in node.names:
                    if f"{module}.{alias.name}" in files:
                        found.add(f"{module}.{alias.name}")
        graph[name] = (path, found - {name})
    return graph


def closure(graph: dict[str, tuple[Path, set[str]]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        m = todo.pop()
        if m in seen or m not in graph:
            continue
        seen.add(m)
        todo.extend(graph[m][1])
    return seen


def tests_for(graph, tree: Path) -> dict[str, tuple[list[str], set[str]]]:
    """Unit test file (relative path) -> (its modules closure)."""
    out = {}
    for name, (path, _) in graph.items():
        rel = path.relative_to(tree).as_posix()
        if rel.startswith(UNIT_TESTS + "/") and path.name.startswith("test_"):
            out[rel] = closure(graph, name)
    return out


# ------------------------------------------------------------------------------------------------ filters

def _spans(source: str) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Source ranges whose mutants are left out (see FILTERS)."""
    spans = []

    def span(node):
        spans.append(((node.lineno, node.col_offset), (node.end_lineno, node.end_col_offset)))

    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            if node.returns is not None:
                span(node.returns)
            args = node.args
            for a in [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg]:
                if a is not None and a.annotation is not None:
                    span(a.annotation)
        elif isinstance(node, ast.AnnAssign):
            span(node.annotation)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            target = node.func.value
            if node.func.attr in LOG_METHODS and isinstance(target, ast.Name) and target.id in LOG_OBJECTS:
                span(node)
        elif isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
            for arg in [*node.exc.args, *(k.value for k in node.exc.keywords)]:
                span(arg)
    for i, line in enumerate(source.splitlines(), 1):
        if "pragma: no mutate" in line:
            spans.append(((i, 0), (i, len(line) + 1)))
    return spans


def filtered(start: tuple[int, int], spans) -> bool:
    return any(a <= tuple(start) < b for a, b in spans)


# ------------------------------------------------------------------------------------------------ sessions

@dataclass
class ModuleRun:
    folder: str
    path: str  # relative to the pack root
    tests: list[str]
    mutants: int = 0
    filtered: int = 0
    baseline_s: float | None = None
    timeout_s: float | None = None
    results: list[dict] = field(default_factory=list)
    pending: int = 0
    error: str | None = None
    shared: bool = False  # imported by a conftest: its objects are built once and shared by the tests
    retested: bool = False  # this run re-tested only the stored survivors (--retest-survivors)


def digest(paths: list[Path], extra: str) -> str:
    h = hashlib.sha256(extra.encode())
    for p in sorted(paths):
        h.update(str(p).encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def cosmic_ray_version() -> str:
    from importlib.metadata import version

    return version("cosmic-ray")


def open_session(tree: Path, work_dir: Path, rel: str, key: str, keep: bool = False):
    """The module's work database (reused when ``key`` matches, or with ``keep`` whatever the key, for a re-test of
    its survivors) and its metadata."""
    from cosmic_ray.commands import init
    from cosmic_ray.work_db import WorkDB
    from cosmic_ray.work_item import WorkerOutcome, WorkResult

    sessions = work_dir / "sessions"
    sessions.mkdir(parents=True, exist_ok=True)
    stem = rel.replace("/", "__").removesuffix(".py")
    db_path, meta_path = sessions / f"{stem}.sqlite", sessions / f"{stem}.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    if keep and db_path.exists() and meta:
        return WorkDB(str(db_path), WorkDB.Mode.open), meta, meta_path
    if meta.get("key") != key or not db_path.exists():
        db_path.unlink(missing_ok=True)
        meta = {"key": key, "durations": {}}
        db = WorkDB(str(db_path), WorkDB.Mode.create)
        init(module_paths=[Path(rel)], work_db=db, operator_cfgs={})  # relative to the copy (the cwd)
        spans = _spans((tree / rel).read_text(encoding="utf-8"))
        items = db.pending_work_items
        unused = [it.job_id for it in items if any(m.operator_name not in OPERATORS for m in it.mutations)]
        inside = [it.job_id for it in items if it.job_id not in set(unused)
                  and any(filtered(m.start_pos, spans) for m in it.mutations)]
        for ids, why in ((unused, "operator not selected"), (inside, FILTERED_POSITION)):
            if ids:
                db.set_multiple_results(ids, WorkResult(output=why, worker_outcome=WorkerOutcome.SKIPPED))
        meta_path.write_text(json.dumps(meta))
    else:
        db = WorkDB(str(db_path), WorkDB.Mode.open)
    return db, meta, meta_path


# The fork runner: the test process is forked from this one after torch, numpy and pytest are imported here (the
# pack itself never is), so each mutant pays for its own tests and the import of the (mutated) pack only, not for
# starting Python and importing torch again. Its pass / fail verdict is the same as the subprocess's (the same
# pytest arguments in a fresh interpreter state for everything the pack's code can reach); `--runner subprocess`
# runs each mutant as Cosmic Ray does, in a new interpreter.
PRELOAD = ("torch", "torch.nn.functional", "numpy", "pytest", "safetensors.torch")


def preload() -> None:
    import importlib

    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    if any(m == PACKAGE or m.startswith(PACKAGE + ".") for m in sys.modules):
        sys.exit(f"{PACKAGE} was imported by the mutation runner itself; the forked test processes would test it "
                 "rather than the mutation copy")


class _ContextSwitch:
    """pytest plugin for the coverage map: lines run while a test's body runs are put under that test's node id;
    lines run anywhere else (imports, collection, fixture set-up and tear-down, which a later test may depend on)
    under ``SHARED``."""

    def __init__(self, cov):
        self.cov, self.nodeids, self.seconds = cov, [], {}

    def pytest_collection_modifyitems(self, items):
        self.nodeids = [item.nodeid for item in items]

    def pytest_runtest_call(self, item):
        self.cov.switch_context(item.nodeid)

    def pytest_runtest_teardown(self, item):
        self.cov.switch_context(SHARED)

    def pytest_runtest_logreport(self, report):
        self.seconds[report.nodeid] = self.seconds.get(report.nodeid, 0.0) + report.duration


SHARED = "shared"
COVERAGE_MAP_VERSION = 3  # bump when the map's content changes: stored maps are then rebuilt


def _coverage_child(target: Path, args: list[str], map_file: Path) -> int:
    """In the forked child: pytest under coverage of ``target`` only; writes {line: [contexts]} and the node ids."""
    import coverage
    import pytest

    cov = coverage.Coverage(data_file=None, include=[str(target)], branch=False)
    cov.start()
    cov.switch_context(SHARED)
    switch = _ContextSwitch(cov)
    code = int(pytest.main(args, plugins=[switch]))
    cov.stop()
    data = cov.get_data()
    lines: dict[int, list[str]] = {}
    for f in data.measured_files():
        if Path(f).resolve() == target.resolve():
            for line, contexts in data.contexts_by_lineno(f).items():
                lines[line] = sorted({c or SHARED for c in contexts})
    # fastest first: a mutant that some test kills is usually caught by a quick one
    order = sorted(switch.nodeids, key=lambda n: switch.seconds.get(n, 0.0))
    map_file.write_text(json.dumps({"version": COVERAGE_MAP_VERSION, "nodeids": order, "lines": lines,
                                    "seconds": {n: switch.seconds.get(n, 0.0) for n in order}}))
    return code


def fork_pytest(tree: Path, tests: list[str], timeout: float, coverage_of: Path | None = None,
                map_file: Path | None = None) -> tuple[int | None, str]:
    """Run pytest on ``tests`` (files or node ids) in a forked child (cwd ``tree``, the copy first on ``sys.path``):
    its exit code, or None when it ran past ``timeout`` (its whole process group is then killed), and the tail of
    its output. With ``coverage_of``, the child also writes that module's coverage map to ``map_file``."""
    import signal

    out = tempfile.TemporaryFile()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 97
        try:
            os.setsid()
            os.dup2(out.fileno(), 1)
            os.dup2(out.fileno(), 2)
            os.chdir(tree)
            sys.dont_write_bytecode = True
            sys.path.insert(0, str(tree.parent))
            import pytest

            args = pytest_args(tests)
            if coverage_of is not None:
                code = _coverage_child(coverage_of, args, map_file)
            else:
                code = int(pytest.main(args))
            where = getattr(sys.modules.get(PACKAGE), "__file__", None)
            if where and Path(where).resolve().parent != tree.resolve():
                print(f"{PACKAGE} was imported from {where}, not from the copy {tree}", flush=True)
                code = 98
        except BaseException:  # noqa: BLE001 - report anything, exit with a failure code
            import traceback

            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    deadline = time.monotonic() + timeout
    status = None
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            status = None
            break
        time.sleep(0.005)
    out.seek(0)
    text = out.read().decode("utf-8", "replace")[-4000:]
    out.close()
    if status is None:
        return None, text
    return (os.waitstatus_to_exitcode(status) if hasattr(os, "waitstatus_to_exitcode") else status >> 8), text


def statement_lines(source: str) -> tuple[dict[int, tuple[int, int]], set[int]]:
    """For each line, the lines of the innermost statement holding it (for a compound statement, its header: the
    lines before its body), and the lines inside functions with a result cache (``functools.cache`` /
    ``lru_cache``), whose effects outlive the test that ran them."""
    tree = ast.parse(source)
    spans: dict[int, tuple[int, int]] = {}
    cached: set[int] = set()
    stmts = [n for n in ast.walk(tree) if isinstance(n, ast.stmt)]
    for node in sorted(stmts, key=lambda n: -(n.end_lineno - n.lineno)):  # outermost first, inner ones overwrite
        end = node.end_lineno
        bodies = [getattr(node, f) for f in ("body", "orelse", "finalbody", "handlers") if getattr(node, f, None)]
        if bodies:
            first = min(b[0].lineno for b in bodies)
            end = max(node.lineno, first - 1)
        for line in range(node.lineno, end + 1):
            spans[line] = (node.lineno, end)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names = {ast.unparse(d.func if isinstance(d, ast.Call) else d).rsplit(".", 1)[-1]
                     for d in node.decorator_list}
            if names & {"lru_cache", "cache"}:
                cached.update(range(node.lineno, node.end_lineno + 1))
    return spans, cached


def select_tests(coverage_map: dict, spans, cached: set[int], line: int) -> list[str] | None:
    """The node ids of the tests that run the statement holding ``line`` ([] when none does), or of every test when
    the line runs outside a test body or inside a cached function; fastest first."""
    lo, hi = spans.get(line, (line, line))
    hit: set[str] = set()
    for ln in range(lo, hi + 1):
        hit.update(coverage_map["lines"].get(str(ln), []))
    if line in cached or SHARED in hit:
        return list(coverage_map["nodeids"])
    return [n for n in coverage_map["nodeids"] if n in hit]


NOT_REACHED = "no test reaches this line"
def failed_test(output: str) -> str | None:
    """The node id of the first test pytest's short summary reports as failed (or erroring), if any."""
    for line in output.splitlines():
        if line.startswith(("FAILED ", "ERROR ")):
            return squash(line.split(" - ")[0].split(" ", 1)[1])
    return None


def count_kill(counts: dict[str, int], output: str) -> None:
    nodeid = failed_test(output)
    if nodeid:
        counts[nodeid] = counts.get(nodeid, 0) + 1


def killers(db) -> dict[str, int]:
    """How many of a module's mutants each test (node id) was the first to fail on, from the stored results."""
    counts: dict[str, int] = {}
    for _item, result in db.completed_work_items:
        count_kill(counts, result.output or "")
    return counts


MIN_TEST_SECONDS = 0.5
KILL_PRIOR = 0.1  # a test that has not failed first yet counts as a tenth of one that has: tests are run by
# expected cost per kill, time / chance, and a test that has caught earlier mutants is the likelier to catch the next


def killers_first(tests: list[str], counts: dict[str, int], seconds: dict[str, float] | None = None) -> list[str]:
    """``tests`` (node ids or files) in the order that should reach a failure soonest: by a test's time (at least
    ``MIN_TEST_SECONDS``) over ``KILL_PRIOR`` plus the number of the module's earlier mutants it failed first on
    (node ids with their measured ``seconds``), else by that number alone; ties keep their order (fastest first).
    With ``-x`` only the time to the first failure changes, not the outcome."""
    def kills(test: str) -> int:
        if "::" in test:
            return counts.get(test, 0)
        return sum(n for nodeid, n in counts.items() if nodeid.split("::")[0] == test)

    if seconds:  # a test's time under a mutant is often more than in the unmutated run (caches): 0.5 s at least
        return sorted(tests, key=lambda t: max(MIN_TEST_SECONDS, seconds.get(t, 0.0)) / (KILL_PRIOR + kills(t)))
    return sorted(tests, key=lambda t: -kills(t))


def fork_mutate_and_test(mutations, tree: Path, tests: list[str], timeout: float):
    """Cosmic Ray's ``mutate_and_test`` (apply the mutation on disk, test, put the file back) with the fork runner."""
    import difflib
    import traceback

    import cosmic_ray.plugins
    from cosmic_ray.mutating import use_mutation
    from cosmic_ray.work_item import TestOutcome, WorkerOutcome, WorkResult

    try:
        (m,) = mutations
        operator = cosmic_ray.plugins.get_operator(m.operator_name)(**(getattr(m, "operator_args", None) or {}))
        with use_mutation(m.module_path, operator, m.occurrence) as (original, mutated):
            if mutated is None:
                return WorkResult(worker_outcome=WorkerOutcome.NO_TEST)
            code, output = fork_pytest(tree, tests, timeout) if tests else (0, NOT_REACHED)
        diff = "\n".join(["--- mutation diff ---", *difflib.unified_diff(
            original.split("\n"), mutated.split("\n"), fromfile=f"a/{m.module_path}", tofile=f"b/{m.module_path}",
            lineterm="")])
        if code is None:
            return WorkResult(output="timeout", diff=diff, test_outcome=TestOutcome.KILLED,
                              worker_outcome=WorkerOutcome.NORMAL)
        return WorkResult(output=output, diff=diff,
                          test_outcome=TestOutcome.KILLED if code != 0 else TestOutcome.SURVIVED,
                          worker_outcome=WorkerOutcome.NORMAL)
    except Exception:  # noqa: BLE001 - as Cosmic Ray: an error of the machinery makes the mutant incompetent
        return WorkResult(output=traceback.format_exc(), test_outcome=TestOutcome.INCOMPETENT,
                          worker_outcome=WorkerOutcome.EXCEPTION)


def run_baseline(tree: Path, env: dict[str, str], tests: list[str], timeout: float,
                 runner: str = "subprocess") -> tuple[bool, float, str]:
    t0 = time.perf_counter()
    if runner == "fork":
        code, output = fork_pytest(tree, tests, timeout)
        seconds = time.perf_counter() - t0
        return code == 0, seconds, output if code is not None else f"timed out after {timeout:.0f} s"
    try:
        proc = subprocess.run(pytest_command(tests), cwd=tree, env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, time.perf_counter() - t0, f"timed out after {timeout:.0f} s"
    return proc.returncode == 0, time.perf_counter() - t0, (proc.stdout + proc.stderr)[-2000:]


def changed_lines(diff: str) -> tuple[str, str]:
    old = [ln[1:] for ln in diff.splitlines() if ln.startswith("-") and not ln.startswith("---") and ln[1:].strip()]
    new = [ln[1:] for ln in diff.splitlines() if ln.startswith("+") and not ln.startswith("+++") and ln[1:].strip()]
    return " / ".join(squash(x) for x in old), " / ".join(squash(x) for x in new)


def squash(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def classify(result) -> str:
    from cosmic_ray.work_item import TestOutcome, WorkerOutcome

    if result.worker_outcome == WorkerOutcome.SKIPPED:
        return "filtered"
    if result.worker_outcome == WorkerOutcome.NO_TEST:
        return "not-applied"
    if result.worker_outcome in (WorkerOutcome.EXCEPTION, WorkerOutcome.ABNORMAL):
        return "incompetent"
    if result.test_outcome == TestOutcome.INCOMPETENT:
        return "incompetent"
    if result.test_outcome == TestOutcome.KILLED:
        return "timeout" if result.output == "timeout" else "killed"
    return "survived"


def plan_modules(tree: Path, folders: list[str]) -> tuple[list[ModuleRun], dict]:
    graph = import_graph(tree)
    test_closures = tests_for(graph, tree)
    plans = []
    for folder in folders:
        for path in sorted((tree / folder).glob("*.py")):
            rel = path.relative_to(tree).as_posix()
            name = module_name(path, tree)
            # the files that import the module themselves first: a killed mutant usually stops there
            direct = {t for t in test_closures if name in graph[module_name(tree / t, tree)][1]}
            tests = sorted((t for t, mods in test_closures.items() if name in mods), key=lambda t: (t not in direct, t))
            shared = any(name in closure(graph, module_name(c, tree)) for c in (tree / "tests").rglob("conftest.py"))
            plans.append(ModuleRun(folder, rel, tests, shared=shared))
    return plans, graph


def only_modules(plans: list[ModuleRun], modules: list[str]) -> list[ModuleRun]:
    """The plans of the named module files (paths relative to the pack root); an unknown name stops the command."""
    known = {p.path for p in plans}
    unknown = [m for m in modules if m not in known]
    if unknown:
        sys.exit(f"--module {', '.join(unknown)}: not a module of a family folder; write it as e.g. "
                 "guidance/pag_runtime.py")
    return [p for p in plans if p.path in modules]


def merge_module_records(old: dict | None, new: dict) -> dict:
    """The folder record ``old`` with the modules of ``new`` (a ``--module`` run) put in place of the same modules;
    each module run this time carries the date and commit of its run."""
    before = {m["module"]: {"date": old.get("date"), "commit": old.get("commit"), **m} for m in (old or {}).get(
        "modules", [])}
    stamped = []
    for m in new["modules"]:
        if m.get("retested") and m["module"] in before:  # its mutants were run then, its survivors again now
            was = before[m["module"]]
            stamped.append({**m, "date": was["date"], "commit": was["commit"], "retested": new["commit"]})
        else:
            stamped.append({**m, "date": new["date"], "commit": new["commit"]})
    if not old:
        return {**new, "modules": stamped}
    fresh = {m["module"]: m for m in stamped}
    modules = [fresh.pop(m["module"], m) for m in old["modules"]]
    return {**old, "modules": modules + list(fresh.values())}


def session_key(tree: Path, graph, plan: ModuleRun) -> str:
    mods = {module_name(tree / plan.path, tree)}
    for t in plan.tests:
        mods |= closure(graph, module_name(tree / t, tree))
    files = [graph[m][0] for m in mods if m in graph] + [tree / "tests" / "conftest.py",
                                                         tree / UNIT_TESTS / "conftest.py"]
    return digest(sorted(set(files)), f"{SETTINGS_VERSION}|{cosmic_ray_version()}|{' '.join(sorted(plan.tests))}")


def run_folder(tree: Path, work_dir: Path, env: dict[str, str], graph, plans: list[ModuleRun], args,
               estimate_only: bool = False) -> None:
    from cosmic_ray.mutating import mutate_and_test

    old_env, old_cwd = dict(os.environ), os.getcwd()
    os.environ.clear()
    os.environ.update(env)  # cosmic-ray's test runner passes its own environment on
    os.chdir(tree)  # module paths are relative to the copy's root, and the tests run there
    if args.runner == "fork":
        preload()
    try:
        todo = []  # (plan, db, meta, meta_path, item)
        opened = []
        for plan in plans:
            key = session_key(tree, graph, plan)
            db, meta, meta_path = open_session(tree, work_dir, plan.path, key, keep=args.retest_survivors)
            opened.append((plan, db, meta, meta_path))
            pending = db.pending_work_items
            if args.retest_survivors and not estimate_only:
                pending, plan.retested = stored_survivors(tree, plan, db), True
                if sorted(meta.get("tests") or []) != sorted(plan.tests):
                    meta.pop("coverage", None)  # the test set changed: its coverage map is built again
                meta.setdefault("retested", []).append({"key": key, "commit": STARTED_AT.get("commit"),
                                                        "survivors": len(pending)})
                meta_path.write_text(json.dumps(meta))
            pending = sorted(pending, key=lambda it: (tuple(it.mutations[0].start_pos), it.mutations[0].operator_name,
                                                      it.mutations[0].occurrence))
            if pending and not plan.tests:
                plan.error = NO_TESTS
                if not estimate_only:  # nothing can kill these: recorded as survivors without a test run
                    record_untested(tree, db, pending)
                    pending = []
            if pending and not plan.error and (meta.get("baseline_s") is None
                                               or sorted(meta.get("tests") or []) != sorted(plan.tests)
                                               or meta.get("runner", "subprocess") != args.runner):
                ok, seconds, output = run_baseline(tree, env, plan.tests, args.baseline_timeout, args.runner)
                if not ok:
                    plan.error = f"baseline failed: {output.strip().splitlines()[-1] if output.strip() else '?'}"
                    log_line(f"  {plan.path}: {plan.error}")
                else:
                    meta["baseline_s"], meta["tests"], meta["runner"] = seconds, plan.tests, args.runner
                    meta_path.write_text(json.dumps(meta))
            if (pending and not plan.error and not estimate_only and args.runner == "fork" and args.select
                    and meta.get("coverage", {}).get("version") != COVERAGE_MAP_VERSION):
                map_file = meta_path.with_suffix(".coverage.json")
                code, output = fork_pytest(tree, plan.tests, args.baseline_timeout, coverage_of=tree / plan.path,
                                           map_file=map_file)
                if code != 0:
                    plan.error = f"coverage run failed: {output.strip().splitlines()[-1] if output.strip() else '?'}"
                    log_line(f"  {plan.path}: {plan.error}")
                else:
                    meta["coverage"] = json.loads(map_file.read_text())
                    meta_path.write_text(json.dumps(meta))
            plan.baseline_s = meta.get("baseline_s")
            if plan.baseline_s is not None:
                plan.timeout_s = max(args.min_timeout, args.timeout_factor * plan.baseline_s)
            if not plan.error:
                todo.extend((plan, db, meta, meta_path, item) for item in pending)
        if not estimate_only:
            if args.max_mutants is not None and len(todo) > args.max_mutants:
                step = len(todo) / max(1, args.max_mutants)
                todo = [todo[int(i * step)] for i in range(args.max_mutants)]  # 0: only collect what was run
            statements: dict[str, tuple] = {}
            kills = {plan.path: killers(db) for plan, db, _meta, _path in opened}
            for n, (plan, db, meta, meta_path, item) in enumerate(todo, 1):
                t0 = time.perf_counter()
                if args.runner == "fork":
                    tests = plan.tests
                    if args.select and plan.shared:  # a conftest's shared objects: every test, fastest first
                        tests = list(meta["coverage"]["nodeids"])
                    elif args.select:
                        if plan.path not in statements:
                            statements[plan.path] = statement_lines((tree / plan.path).read_text(encoding="utf-8"))
                        tests = select_tests(meta["coverage"], *statements[plan.path], item.mutations[0].start_pos[0])
                    order = killers_first(tests, kills[plan.path], meta.get("coverage", {}).get("seconds"))
                    result = fork_mutate_and_test(item.mutations, tree, order, plan.timeout_s)
                    count_kill(kills[plan.path], result.output or "")
                else:
                    result = mutate_and_test(item.mutations, shlex.join(pytest_command(plan.tests)), plan.timeout_s)
                seconds = time.perf_counter() - t0
                db.set_result(item.job_id, result)
                meta["durations"][item.job_id] = seconds
                meta_path.write_text(json.dumps(meta))
                m = item.mutations[0]
                log_line(f"  [{n}/{len(todo)}] {plan.path}:{m.start_pos[0]} {m.operator_name.removeprefix('core/')}"
                         f" -> {classify(result)} ({seconds:.1f} s)")
        for plan, db, meta, _ in opened:
            collect(plan, db, meta)
            db.close()
    finally:
        os.chdir(old_cwd)
        os.environ.clear()
        os.environ.update(old_env)


def still_there(lines: list[str], line: int, old: str) -> bool:
    """Whether line ``line`` (1-based) of the module's source is where a mutant's original text ``old`` (its
    diff's removed lines, whitespace collapsed, joined by " / ") begins."""
    here = squash(lines[line - 1]) if 1 <= line <= len(lines) else ""
    return bool(here) and old.startswith(here)


def stored_survivors(tree: Path, plan: ModuleRun, db) -> list:
    """The work items of the module's stored survivors, for ``--retest-survivors``; stops with the reason when the
    module's source no longer holds a survivor's original line where its mutation was made (the stored mutants then
    describe another version of the module: run it afresh)."""
    lines = (tree / plan.path).read_text(encoding="utf-8").splitlines()
    items = []
    for item, result in db.completed_work_items:
        if classify(result) != "survived":
            continue
        m = item.mutations[0]
        old, _ = changed_lines(result.diff or "")
        if not still_there(lines, m.start_pos[0], old):
            sys.exit(f"{plan.path}:{m.start_pos[0]} is no longer the line its stored survivor mutated ({old!r}); "
                     "run the module without --retest-survivors")
        items.append(item)
    return items


def record_untested(tree: Path, db, items) -> None:
    """Survivors for the mutants of a module no unit test imports (their diffs, no test run)."""
    import difflib

    import cosmic_ray.plugins
    from cosmic_ray.mutating import mutate_code
    from cosmic_ray.work_item import TestOutcome, WorkerOutcome, WorkResult

    for item in items:
        m = item.mutations[0]
        source = (tree / m.module_path).read_text(encoding="utf-8")
        mutated = mutate_code(source, cosmic_ray.plugins.get_operator(m.operator_name)(**m.operator_args),
                              m.occurrence)
        if mutated is None:
            db.set_result(item.job_id, WorkResult(worker_outcome=WorkerOutcome.NO_TEST))
            continue
        diff = "\n".join(difflib.unified_diff(source.split("\n"), mutated.split("\n"), lineterm=""))
        db.set_result(item.job_id, WorkResult(output=NO_TESTS, diff=diff, test_outcome=TestOutcome.SURVIVED,
                                              worker_outcome=WorkerOutcome.NORMAL))


def collect(plan: ModuleRun, db, meta: dict) -> None:
    plan.pending = len(db.pending_work_items)
    for item, result in db.completed_work_items:
        kind = classify(result)
        if kind == "filtered":
            plan.filtered += result.output == FILTERED_POSITION
            continue
        m = item.mutations[0]
        entry = {"outcome": kind, "line": m.start_pos[0], "operator": m.operator_name.removeprefix("core/"),
                 "where": m.definition_name or "", "seconds": meta["durations"].get(item.job_id)}
        if kind == "survived":
            entry["old"], entry["new"] = changed_lines(result.diff or "")
            entry["no_tests"] = result.output == NO_TESTS
            entry["unreached"] = result.output == NOT_REACHED
        plan.results.append(entry)
    plan.mutants = len(plan.results) + plan.pending


# ------------------------------------------------------------------------------------------------ reasons

def load_reasons() -> list[dict]:
    if not REASONS_FILE.exists():
        return []
    entries = tomllib.loads(REASONS_FILE.read_text(encoding="utf-8")).get("survivor", [])
    for e in entries:
        for key in ("file", "old", "reason"):
            if key not in e:
                sys.exit(f"{REASONS_FILE.name}: an entry lacks '{key}': {e}")
        if not re.match(r"^(equivalent|untested):", e["reason"]):
            sys.exit(f"{REASONS_FILE.name}: a reason must start with 'equivalent:' or 'untested:': {e['reason']!r}")
    return entries


def reason_for(survivor: dict, file: str, reasons: list[dict]) -> tuple[str, int | None]:
    for i, e in enumerate(reasons):
        if (e["file"] == file and squash(e["old"]) == survivor["old"]
                and squash(e.get("new", survivor["new"])) == survivor["new"]
                and e.get("where", survivor["where"]) == survivor["where"]):
            return e["reason"], i
    if survivor.get("no_tests"):
        return f"untested: {NO_TESTS} (not run)", -1
    return "not reviewed" + (f" ({NOT_REACHED})" if survivor.get("unreached") else ""), None


# ------------------------------------------------------------------------------------------------ glue

@dataclass
class Defect:
    name: str
    description: str
    file: str
    old: str
    new: str
    tests: list[str]


def load_defects(tree: Path) -> list[Defect]:
    data = tomllib.loads(DEFECTS_FILE.read_text(encoding="utf-8"))
    defects = [Defect(d["name"], d["description"], d["file"], d["old"], d["new"], list(d["tests"]))
               for d in data.get("defect", [])]
    problems = []
    names = [d.name for d in defects]
    problems += [f"defect name '{n}' is used twice" for n in sorted({n for n in names if names.count(n) > 1})]
    for d in defects:
        path = tree / d.file
        count = path.read_text(encoding="utf-8").count(d.old) if path.is_file() else -1
        if count == -1:
            problems.append(f"{d.name}: file {d.file} does not exist")
        elif count != 1:
            problems.append(f"{d.name}: the old text occurs {count} times in {d.file} (it must occur exactly once): "
                            f"{d.old!r}")
        if d.old == d.new:
            problems.append(f"{d.name}: old and new text are the same")
        problems += [f"{d.name}: test file {t} does not exist" for t in d.tests if not (tree / t).is_file()]
    if problems:
        sys.exit(f"{DEFECTS_FILE.name} no longer matches the code; fix these entries:\n  " + "\n  ".join(problems))
    return defects


def comfyui_of(tree: Path, env: dict[str, str]) -> str | None:
    code = f"from {PACKAGE}.runner.comfy_host import find_comfyui; print(find_comfyui() or '')"
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=tree, capture_output=True, text=True,
                         check=True).stdout.strip()
    return out or None


def first_failure(output: str) -> str:
    return failed_test(output) or (squash(output.strip().splitlines()[-1]) if output.strip() else "")


def run_glue(tree: Path, env: dict[str, str], args, only: list[str] | None) -> dict:
    defects = load_defects(tree)
    if only:
        unknown = sorted(set(only) - {d.name for d in defects})
        if unknown:
            sys.exit(f"unknown defect(s): {', '.join(unknown)}; see {DEFECTS_FILE.name}")
        defects = [d for d in defects if d.name in only]
    comfy = comfyui_of(tree, env)
    if comfy is None:
        msg = ("skipped: no ComfyUI checkout found (looked at $COMFYUI_PATH, an enclosing ComfyUI and ~/ComfyUI); "
               "the glue defects need the host test tier")
        log_line(f"glue: {msg}")
        return {"skipped": msg, "defects": [{"name": d.name, "description": d.description, "file": d.file,
                                             "tests": d.tests, "outcome": "not run"} for d in defects]}
    log_line(f"glue: ComfyUI at {comfy}")
    baselines: dict[tuple[str, ...], float] = {}
    rows = []
    for d in defects:
        key = tuple(d.tests)
        if key not in baselines:
            ok, seconds, output = run_baseline(tree, env, d.tests, args.baseline_timeout)
            if not ok:
                sys.exit(f"glue: the host tests {', '.join(d.tests)} fail without any defect:\n{output}")
            baselines[key] = seconds
            log_line(f"  baseline {' '.join(d.tests)}: {seconds:.1f} s")
        timeout = max(args.min_timeout, args.timeout_factor * baselines[key])
        path = tree / d.file
        original = path.read_text(encoding="utf-8")
        path.write_text(original.replace(d.old, d.new, 1), encoding="utf-8")
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(pytest_command(d.tests), cwd=tree, env=env, capture_output=True, text=True,
                                  timeout=timeout)
            outcome = "killed" if proc.returncode != 0 else "survived"
            detail = first_failure(proc.stdout + proc.stderr) if proc.returncode != 0 else ""
        except subprocess.TimeoutExpired:
            outcome, detail = "timeout", f"ran past {timeout:.0f} s"
        finally:
            path.write_text(original, encoding="utf-8")
        seconds = time.perf_counter() - t0
        log_line(f"  {d.name}: {outcome} ({seconds:.1f} s) {detail}")
        rows.append({"name": d.name, "description": d.description, "file": d.file, "tests": d.tests,
                     "outcome": outcome, "caught_by": detail, "seconds": round(seconds, 1)})
    return {"comfyui": comfy, "defects": rows}


# ------------------------------------------------------------------------------------------------ report

def folder_record(plans: list[ModuleRun], run_seconds: float | None, runner: str = "subprocess") -> dict:
    modules = []
    for p in plans:
        counts = {k: sum(r["outcome"] == k for r in p.results)
                  for k in ("killed", "timeout", "survived", "incompetent", "not-applied")}
        durations = [r["seconds"] for r in p.results if r.get("seconds") is not None]
        modules.append({
            "module": p.path, "tests": p.tests, "mutants": p.mutants, "run": len(p.results), "pending": p.pending,
            "filtered": p.filtered, **counts, "baseline_s": None if p.baseline_s is None else round(p.baseline_s, 2),
            "timeout_s": None if p.timeout_s is None else round(p.timeout_s, 1), "error": p.error,
            "mutant_seconds": [round(s, 2) for s in durations], "retested": p.retested,
            "survivors": [{k: r.get(k) for k in ("line", "where", "operator", "old", "new", "no_tests", "unreached")}
                          for r in sorted(p.results, key=lambda r: (r["line"], r["operator"]))
                          if r["outcome"] == "survived"],
        })
    return {"date": dt.datetime.now().isoformat(timespec="seconds"), "commit": STARTED_AT.get("commit") or git_commit(),
            "wall_s": None if run_seconds is None else round(run_seconds, 1), "runner": runner, "modules": modules}


STARTED_AT: dict[str, str] = {}  # the checkout's commit when the copy was made (what the run tests)


def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
        return sha + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def summarise(record: dict, reasons: list[dict], used: set[int]) -> dict:
    """Folder totals with the reviewed reasons applied (kill rate leaves reviewed equivalents out)."""
    tot = {k: 0 for k in ("mutants", "run", "pending", "filtered", "killed", "timeout", "survived", "incompetent",
                          "not-applied", "equivalent", "untested", "not_reviewed")}
    survivors, seconds = [], []
    for m in record["modules"]:
        for k in ("mutants", "run", "pending", "filtered", "killed", "timeout", "survived", "incompetent",
                  "not-applied"):
            tot[k] += m[k]
        seconds += m["mutant_seconds"]
        for s in m["survivors"]:
            reason, idx = reason_for(s, m["module"], reasons)
            if idx is not None and idx >= 0:
                used.add(idx)
            kind = reason.split(":")[0] if idx is not None else "not_reviewed"
            tot[kind] += 1
            survivors.append({**s, "file": m["module"], "reason": reason})
        m["kill_rate"] = kill_rate(m["killed"] + m["timeout"], m["survived"] - sum(
            1 for s in m["survivors"] if reason_for(s, m["module"], reasons)[0].startswith("equivalent:")))
    detected = tot["killed"] + tot["timeout"]
    tot["kill_rate"] = kill_rate(detected, tot["survived"] - tot["equivalent"])
    tot["raw_kill_rate"] = kill_rate(detected, tot["survived"])
    tot["mean_s_per_mutant"] = round(statistics.fmean(seconds), 2) if seconds else None
    tot["median_s_per_mutant"] = round(statistics.median(seconds), 2) if seconds else None
    return {**tot, "survivor_list": survivors}


def kill_rate(detected: int, survived: int) -> float | None:
    return None if detected + survived == 0 else round(detected / (detected + survived), 4)


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render(data: dict, reasons: list[dict]) -> str:
    used: set[int] = set()
    lines = [
        "# Mutation testing",
        "",
        f"Tool: Cosmic Ray {data.get('tool_version', '?')}, one module at a time, each mutant tested by the unit "
        "test files that import the module (directly or through other modules), stopping at the first failure. "
        "Fork runner (the column 'run on' says which): each mutant's tests run in a process forked after torch and "
        "pytest are imported, and only the tests whose bodies reach the mutated statement in a coverage run of the "
        "unmutated module (every test for statements run at import, in fixtures, in cached functions, or in "
        "modules a conftest imports), ordered by each test's time (0.5 s at least) over the number of the module's "
        "earlier mutants it failed first on (plus 0.1); a survivor no test reaches is marked so and not run. "
        "The selection can miss a kill (a test reusing what another computed), never invent one. "
        "Glue (nodes/): named behavioural defects against the host test tier. "
        "Command: `OMP_NUM_THREADS=1 .venv/bin/python benchmarks/mutation.py` (see its docstring).",
        "",
        "**Kill rate** = (killed + timed out) / (killed + timed out + survivors not reviewed as equivalent). "
        "Survivors reviewed as `equivalent:` in `benchmarks/mutation_equivalents.toml` (no test can tell them "
        "from the original) are left out of the denominator; `untested:` and not-reviewed survivors stay in. "
        "Raw rate: every survivor counted. Goal: 90% or more.",
        "",
        "Operators: " + ", ".join(f"`{o.removeprefix('core/')}`" for o in OPERATORS) + ".",
        "",
        "Not mutated: " + "; ".join(FILTERS) + ".",
        "",
        "## Family folders",
        "",
        "| folder | run on | mutants | run | pending | killed | timeout | survived | equivalent | untested | "
        "not reviewed | incompetent | kill rate | raw | s / mutant (mean, median) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    folders = data.get("folders", {})
    sums = {name: summarise(rec, reasons, used) for name, rec in folders.items()}
    for name in [*FAMILIES, *OPTIONAL_FAMILIES]:
        if name not in sums:
            continue
        s, rec = sums[name], folders[name]
        lines.append(
            f"| {name}/ | {rec['date'][:10]}, {rec['commit']}, {rec.get('runner', 'subprocess')} runner | "
            f"{s['mutants']} | {s['run']} | {s['pending']} | "
            f"{s['killed']} | {s['timeout']} | {s['survived']} | {s['equivalent']} | {s['untested']} | "
            f"{s['not_reviewed']} | {s['incompetent']} | **{pct(s['kill_rate'])}** | {pct(s['raw_kill_rate'])} | "
            f"{s['mean_s_per_mutant']}, {s['median_s_per_mutant']} |")
    missing = [f for f in FAMILIES if f not in sums]
    if missing:
        lines += ["", "Not run yet: " + ", ".join(f"{f}/" for f in missing) + "."]
    for name in [*FAMILIES, *OPTIONAL_FAMILIES]:
        if name not in sums:
            continue
        s, rec = sums[name], folders[name]
        lines += ["", f"### {name}/", "",
                  "| module | unit test files | mutants | run | killed | timeout | survived | kill rate | baseline s | "
                  "timeout s |", "|---|---|---|---|---|---|---|---|---|---|"]
        for m in rec["modules"]:
            if not m["mutants"]:
                continue
            tests = ", ".join(Path(t).name for t in m["tests"]) or "none"
            note = f" ({m['error']})" if m["error"] else ""
            if m.get("date"):  # run on its own (--module)
                note += f" (run {m['date'][:10]}, {m['commit']}" + (
                    f"; survivors re-tested at {m['retested']})" if isinstance(m.get("retested"), str) else ")")
            lines.append(f"| {m['module']}{md_cell(note)} | {tests} | {m['mutants']} | {m['run']} | {m['killed']} | "
                         f"{m['timeout']} | {m['survived']} | {pct(m['kill_rate'])} | {m['baseline_s']} | "
                         f"{m['timeout_s']} |")
        if s["survivor_list"]:
            lines += ["", "Survivors:", "", "| where | mutation | reason |", "|---|---|---|"]
            for v in s["survivor_list"]:
                where = f"{v['file']}:{v['line']}" + (f" ({v['where']})" if v["where"] else "")
                mutation = f"{v['operator']}: `{md_cell(v['old'])}` → `{md_cell(v['new']) or '(line removed)'}`"
                lines.append(f"| {md_cell(where)} | {mutation} | {md_cell(v['reason'])} |")
    glue = data.get("glue")
    lines += ["", "## Glue: named behavioural defects (nodes/)", ""]
    if not glue:
        lines.append("Not run yet (`benchmarks/mutation.py --glue`).")
    else:
        if glue.get("skipped"):
            lines.append(f"{glue['skipped'].capitalize()}.")
        else:
            rows = glue["defects"]
            caught = sum(r["outcome"] in ("killed", "timeout") for r in rows)
            lines.append(f"Run on {glue.get('date', '?')[:10]}, {glue.get('commit', '?')}, against ComfyUI at "
                         f"`{glue.get('comfyui')}`: **{caught} of {len(rows)} caught**.")
        lines += ["", "| defect | file | what it breaks | host tests | result | first failing test | s |",
                  "|---|---|---|---|---|---|---|"]
        for r in glue["defects"]:
            tests = ", ".join(Path(t).name for t in r["tests"])
            lines.append(f"| {r['name']} | {r['file']} | {md_cell(r['description'])} | {tests} | {r['outcome']} | "
                         f"{md_cell(r.get('caught_by', '').removeprefix('FAILED '))} | {r.get('seconds', '')} |")
    est = data.get("estimate")
    if est:
        lines += ["", "## Full-run estimate", "",
                  f"Made on {est['date'][:10]}: mutant counts after filtering, and each module's unit-test baseline "
                  f"time. A mutant costs on average {est['ratio']:.2f} x its module's baseline (measured over "
                  f"{est['ratio_from']} run mutants: killed mutants stop at the first failing test).", "",
                  "| folder | mutants | baseline s (sum over modules) | estimated hours |", "|---|---|---|---|"]
        for name, f in est["folders"].items():
            lines.append(f"| {name}/ | {f['mutants']} | {f['baseline_s']} | {f['hours']:.1f} |")
        lines.append(f"| all | {est['mutants']} | | **{est['hours']:.1f}** |")
    stale = [r for i, r in enumerate(reasons) if i not in used and r["file"].split("/")[0] in folders]
    if stale:
        lines += ["", "## Reviewed reasons that matched no survivor", "",
                  "The code changed or the mutant is now killed; remove or update these entries of "
                  "`benchmarks/mutation_equivalents.toml`:", ""]
        lines += [f"- {r['file']}: `{md_cell(r['old'])}` → `{md_cell(r.get('new', '(any)'))}`" for r in stale]
    data["summary"] = {name: {k: v for k, v in s.items() if k != "survivor_list"} for name, s in sums.items()}
    data["survivors"] = {name: s["survivor_list"] for name, s in sums.items()}
    return "\n".join(lines) + "\n"


def write_results(data: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    text = render(data, load_reasons())
    (RESULTS / "mutation.md").write_text(text, encoding="utf-8")
    (RESULTS / "mutation.json").write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    log_line(f"wrote {RESULTS / 'mutation.md'} and mutation.json")


def estimate(plans: list[ModuleRun], data: dict) -> dict:
    pairs = []  # (mutant seconds, baseline seconds) over every run mutant on record
    for rec in data.get("folders", {}).values():
        for m in rec["modules"]:
            if m["baseline_s"]:
                pairs += [(s, m["baseline_s"]) for s in m["mutant_seconds"]]
    ratio = sum(s for s, _ in pairs) / sum(b for _, b in pairs) if pairs else 1.0
    folders: dict[str, dict] = {}
    for p in plans:
        f = folders.setdefault(p.folder, {"mutants": 0, "baseline_s": 0.0, "seconds": 0.0})
        f["mutants"] += p.mutants
        f["baseline_s"] = round(f["baseline_s"] + (p.baseline_s or 0.0), 1)
        f["seconds"] += p.mutants * (p.baseline_s or 0.0) * ratio
    for f in folders.values():
        f["hours"] = f.pop("seconds") / 3600
    return {"date": dt.datetime.now().isoformat(timespec="seconds"), "ratio": ratio, "ratio_from": len(pairs),
            "folders": folders, "mutants": sum(f["mutants"] for f in folders.values()),
            "hours": sum(f["hours"] for f in folders.values())}


# ------------------------------------------------------------------------------------------------ main

def _merged(update: dict, data: dict) -> dict:
    """The results file as it is now, with this run's ``update`` (whole folders, or the glue record) put in."""
    path = RESULTS / "mutation.json"
    current = json.loads(path.read_text()) if path.exists() else {}
    for key in ("summary", "survivors"):
        current.pop(key, None)
    current["tool_version"] = data.get("tool_version")
    current.setdefault("folders", {}).update(update.get("folders", {}))
    if "glue" in update:
        current["glue"] = update["glue"]
    return current


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--folder", action="append", choices=[*FAMILIES, *OPTIONAL_FAMILIES],
                    help="family folder to mutate (repeatable); default: all but proving/, plus the glue")
    ap.add_argument("--module", action="append", help="only this module file of a family folder, e.g. "
                    "guidance/pag_runtime.py (repeatable); the folder's other modules keep their earlier results")
    ap.add_argument("--glue", action="store_true", help="run the named glue defects (default when no --folder)")
    ap.add_argument("--defect", action="append", help="only this glue defect (repeatable; implies --glue)")
    ap.add_argument("--max-mutants", type=int, help="run at most N pending mutants per folder, spread evenly "
                                                    "(the rest stay pending for the next run); 0 runs none and only "
                                                    "reports what the stored sessions hold")
    ap.add_argument("--timeout-factor", type=float, default=3.0, help="per-mutant timeout = factor x baseline")
    ap.add_argument("--min-timeout", type=float, default=30.0, help="lower bound of the per-mutant timeout (s)")
    ap.add_argument("--baseline-timeout", type=float, default=900.0, help="limit for a baseline test run (s)")
    ap.add_argument("--fresh", action="store_true", help="discard stored sessions and start over")
    ap.add_argument("--retest-survivors", action="store_true",
                    help="after tests were added: run only the stored survivors of each module again, against the "
                         "current tests (the module's source must be unchanged; killed mutants are not run again, so "
                         "not for tests that were changed or removed)")
    ap.add_argument("--all-tests", dest="select", action="store_false",
                    help="run every test file of the module for each mutant (default with the fork runner: only "
                         "the tests whose bodies run the mutated statement, from a coverage run of the unmutated "
                         "module; every test when it runs outside a test body or in a cached function)")
    ap.add_argument("--runner", choices=("fork", "subprocess"), default="fork",
                    help="fork: each mutant's tests in a process forked after torch and pytest are imported "
                         "(default, faster); subprocess: a new interpreter per mutant, as Cosmic Ray runs them")
    ap.add_argument("--estimate", action="store_true",
                    help="count the mutants of every folder and time each module's tests; run no mutant")
    ap.add_argument("--report", action="store_true", help="only re-render the results with the current reasons")
    ap.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / (
        "preprint-mutation-" + hashlib.sha1(str(ROOT).encode()).hexdigest()[:8]))
    args = ap.parse_args(argv)

    previous = RESULTS / "mutation.json"
    data = json.loads(previous.read_text()) if previous.exists() else {}
    data.pop("summary", None)
    data.pop("survivors", None)
    if args.report:
        write_results(data)
        return 0
    try:
        import cosmic_ray  # noqa: F401
    except ImportError:
        sys.exit("Cosmic Ray is not installed: .venv/bin/pip install -e '.[mutation]'")
    data["tool_version"] = cosmic_ray_version()

    if args.fresh and args.work_dir.exists():
        shutil.rmtree(args.work_dir)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    STARTED_AT["commit"] = git_commit()
    tree = copy_tree(args.work_dir)
    env = test_env(tree, args.work_dir)
    check_import_redirect(tree, env)
    log_line(f"mutation copy: {tree}")

    modules = list(dict.fromkeys(args.module or []))
    if args.retest_survivors and (args.folder or not modules):
        sys.exit("--retest-survivors re-tests named modules: give them with --module (no --folder)")
    if args.estimate:
        plans, graph = plan_modules(tree, list(args.folder or FAMILIES))
        if modules:
            plans = only_modules(plans, modules)
        t0 = time.perf_counter()
        for folder in dict.fromkeys(p.folder for p in plans):
            log_line(f"{folder}/: counting mutants and timing the tests")
            run_folder(tree, args.work_dir, env, graph, [p for p in plans if p.folder == folder], args,
                       estimate_only=True)
        data["estimate"] = estimate(plans, data)
        log_line(f"estimate ({time.perf_counter() - t0:.0f} s): {data['estimate']['mutants']} mutants, "
                 f"about {data['estimate']['hours']:.1f} h")
        write_results(data)
        return 0

    folders = list(dict.fromkeys(args.folder or ([] if (args.glue or args.defect or modules) else FAMILIES)))
    glue = bool(args.glue or args.defect or not (args.folder or modules))
    whole = set(folders)  # folders run whole; the others only for their --module files
    folders += [f for f in dict.fromkeys(m.split("/")[0] for m in modules) if f not in whole]
    if glue:
        load_defects(tree)  # a stale substitution stops the run before any slow work
    if folders:
        plans, graph = plan_modules(tree, [f for f in folders if f in FAMILIES + OPTIONAL_FAMILIES])
        if modules:
            named = {p.path for p in only_modules(plans, modules)}
            plans = [p for p in plans if p.folder in whole or p.path in named]
        data.setdefault("folders", {})
        for folder in folders:
            mine = [p for p in plans if p.folder == folder]
            log_line(f"{folder}/: {len(mine)} modules")
            t0 = time.perf_counter()
            run_folder(tree, args.work_dir, env, graph, mine, args)
            data["folders"][folder] = folder_record(mine, time.perf_counter() - t0, args.runner)
            if folder not in whole:
                data["folders"][folder] = merge_module_records(_merged({}, data).get("folders", {}).get(folder),
                                                               data["folders"][folder])
            # after every folder, so a long run leaves its results as it goes; merged into the file as it is now,
            # so a run of other folders that finished meanwhile keeps its results
            write_results(_merged({"folders": {folder: data["folders"][folder]}}, data))
    if glue:
        data["glue"] = {"date": dt.datetime.now().isoformat(timespec="seconds"), "commit": git_commit(),
                        **run_glue(tree, env, args, args.defect)}
        write_results(_merged({"glue": data["glue"]}, data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
