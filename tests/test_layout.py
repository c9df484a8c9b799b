"""The layout a reader relies on: the repository's root holds the RLHF method and its CLI, lab/ the instruments that
measure it; the core never imports an instrument (rlhf.py's commands import theirs when they run), and every file
and function stays short enough to read in one sitting."""
import ast
import glob
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORE = sorted(glob.glob(os.path.join(ROOT, "*.py")))
LAB = sorted(glob.glob(os.path.join(ROOT, "lab", "*.py")))


def imports(path):
    """[(module name, at module level?)] of every import statement in the file."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    top = {id(node) for node in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, id(node) in top) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            out.append((node.module or "", id(node) in top))
    return out


def test_the_root_holds_the_method_and_its_cli_only():
    """The flow's 18 files and the data loop's two (label.py: a person's comparisons; online.py: HH's rounds)."""
    names = [os.path.basename(p) for p in CORE]
    assert len(names) <= 20, names
    for spine in ("rlhf.py", "model.py", "reward.py", "ppo.py", "data.py"):
        assert spine in names
    instruments = {os.path.basename(p)[:-3] for p in LAB} - {"__init__"}
    assert not instruments & {n[:-3] for n in names}  # an instrument lives in lab/ only


def test_no_core_file_imports_an_instrument():
    """rlhf.py may import lab/ inside the function of the command that runs it; no other core file at all."""
    for path in CORE:
        for module, top_level in imports(path):
            if module == "lab" or module.startswith("lab."):
                assert os.path.basename(path) == "rlhf.py" and not top_level, f"{path} imports {module}"


def test_instruments_import_the_core_not_each_other_by_bare_name():
    """lab/ is a package: its files import each other as lab.X, so `python -m lab.X` and the CLI both find them."""
    instruments = {os.path.basename(p)[:-3] for p in LAB}
    for path in LAB:
        for module, _ in imports(path):
            assert module.split(".")[0] not in instruments, f"{path} imports {module}; write lab.{module}"


def test_every_file_and_function_reads_in_one_sitting():
    """<= 450 lines a file, <= 80 lines a function (decorators included); model.py <= 350."""
    for path in CORE + LAB:
        source = open(path, encoding="utf-8").read()
        limit = 350 if os.path.basename(path) == "model.py" else 450
        assert len(source.splitlines()) <= limit, path
        for node in ast.walk(ast.parse(source, path)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = min([node.lineno] + [d.lineno for d in node.decorator_list])
                assert node.end_lineno - first + 1 <= 80, f"{path}:{node.lineno} {node.name}"
