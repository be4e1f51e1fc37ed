"""The README's set-up is what CI runs, and its `.[test]` extra brings what the tests import."""

from __future__ import annotations

import ast
import configparser
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Imported by tests that skip (with their reason) where the module is missing, in CI too:
# the GPU backend, and the masked-dense peer (a CPU build must be installed by hand).
OPTIONAL = {"cupy", "cupyx", "cupy_backends", "torch"}
# Distribution names whose import name differs.
IMPORT_NAME = {"scikit-learn": "sklearn", "mpich": None}


def setup_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Set-up", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    return [line for block in blocks for line in block.splitlines() if line.strip()]


def test_ci_runs_the_readme_commands_as_written():
    commands = setup_commands()
    assert len(commands) == 2, commands
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.startswith("#")]
    run = [line for line in ci if line.startswith(".venv/") or line.startswith("python3 ")]
    assert run == commands


def requirement_modules(lines: str) -> set[str]:
    names = set()
    for line in lines.split("\n"):
        name = re.split(r"[<>=!\[; ]", line.strip(), maxsplit=1)[0]
        if name:
            module = IMPORT_NAME.get(name, name.replace("-", "_"))
            if module:
                names.add(module)
    return names


def test_the_test_extra_brings_every_module_the_tests_import():
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    installed = (requirement_modules(config["options"]["install_requires"])
                 | requirement_modules(config["options.extras_require"]["test"]))
    assert "mpi4py" in installed and "hypothesis" in installed
    local = ({p.stem for p in (ROOT / "tests").rglob("*.py")} | {"cupynn", "benchmarks", "tests"}
             | {p.stem for p in (ROOT / "benchmarks").glob("*.py")} | {"cuda_host"})
    imported = set()
    for path in (ROOT / "tests").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    third_party = imported - set(sys.stdlib_module_names) - local - {"__future__"}
    missing = third_party - installed - OPTIONAL
    assert not missing, f"tests import {sorted(missing)}, which `.[test]` does not install"
