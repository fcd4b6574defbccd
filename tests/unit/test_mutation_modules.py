"""The ``--module`` option of the mutation tool (``benchmarks/mutation.py``): the plans it keeps, and how the
results of a run over some modules of a folder go into that folder's earlier record."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

TOOL = Path(__file__).parents[2] / "benchmarks" / "mutation.py"
_spec = importlib.util.spec_from_file_location("preprint_mutation_tool", TOOL)
mutation = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = mutation  # its dataclasses look their module up there
_spec.loader.exec_module(mutation)


def plans():
    return [mutation.ModuleRun("guidance", p, []) for p in ("guidance/a.py", "guidance/b.py", "guidance/c.py")]


def test_only_the_named_modules_are_planned():
    kept = mutation.only_modules(plans(), ["guidance/c.py", "guidance/a.py"])
    assert [p.path for p in kept] == ["guidance/a.py", "guidance/c.py"]
    with pytest.raises(SystemExit, match="guidance/x.py"):
        mutation.only_modules(plans(), ["guidance/a.py", "guidance/x.py"])


def test_module_results_replace_only_their_modules():
    old = {"date": "2026-01-01T00:00:00", "commit": "old", "wall_s": 9.0,
           "modules": [{"module": "guidance/a.py", "killed": 1}, {"module": "guidance/b.py", "killed": 2}]}
    new = {"date": "2026-02-02T00:00:00", "commit": "new", "wall_s": 1.0,
           "modules": [{"module": "guidance/b.py", "killed": 5}, {"module": "guidance/c.py", "killed": 6}]}
    merged = mutation.merge_module_records(old, new)
    assert (merged["date"], merged["commit"], merged["wall_s"]) == ("2026-01-01T00:00:00", "old", 9.0)
    assert merged["modules"] == [
        {"module": "guidance/a.py", "killed": 1},
        {"module": "guidance/b.py", "killed": 5, "date": "2026-02-02T00:00:00", "commit": "new"},
        {"module": "guidance/c.py", "killed": 6, "date": "2026-02-02T00:00:00", "commit": "new"}]
    assert old["modules"][1]["killed"] == 2  # the earlier record itself is not changed
    first = mutation.merge_module_records(None, new)
    assert first["commit"] == "new" and [m["date"] for m in first["modules"]] == [new["date"]] * 2


def test_a_survivor_retest_keeps_the_run_it_came_from_and_names_the_retest():
    old = {"date": "2026-01-01T00:00:00", "commit": "old",
           "modules": [{"module": "guidance/a.py", "killed": 1, "date": "2026-01-05T00:00:00", "commit": "mod"},
                       {"module": "guidance/b.py", "killed": 2}]}
    new = {"date": "2026-02-02T00:00:00", "commit": "new",
           "modules": [{"module": "guidance/a.py", "killed": 3, "retested": True},
                       {"module": "guidance/b.py", "killed": 4, "retested": True},
                       {"module": "guidance/c.py", "killed": 5, "retested": True}]}  # no earlier run: stamped new
    merged = mutation.merge_module_records(old, new)
    assert merged["modules"] == [
        {"module": "guidance/a.py", "killed": 3, "date": "2026-01-05T00:00:00", "commit": "mod", "retested": "new"},
        {"module": "guidance/b.py", "killed": 4, "date": "2026-01-01T00:00:00", "commit": "old", "retested": "new"},
        {"module": "guidance/c.py", "killed": 5, "retested": True, "date": "2026-02-02T00:00:00", "commit": "new"}]


def test_a_survivor_is_retested_only_where_its_line_is_still_the_same():
    lines = ["x = 1", "    if a <  b:", "y = (1 +", "     2)"]
    assert mutation.still_there(lines, 2, "if a < b:")
    assert mutation.still_there(lines, 3, "y = (1 + / 2)")  # a statement over two lines
    assert not mutation.still_there(lines, 1, "x = 2")
    assert not mutation.still_there(lines, 2, "if a <= b:")
    assert not mutation.still_there(lines, 5, "x = 1") and not mutation.still_there(lines, 0, "x = 1")


def test_both_runners_stop_at_a_mutants_first_failing_test():
    assert mutation.pytest_args(["t.py::a", "t.py::b"])[0] == "-x"
    assert mutation.pytest_args(["t.py::a"])[-1] == "t.py::a"
    assert mutation.pytest_command(["t.py"])[1:] == ["-m", "pytest", *mutation.pytest_args(["t.py"])]
