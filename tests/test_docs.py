"""Every ```python block of README.md and docs/*.md works as pasted.

A block is a program (it runs to exit 0 against a mesh this test starts: `sessionmesh run`
serving the README's own `counter.py`), an agent (it imports), a test file (pytest passes
it), or says in its first line that it is a fragment. Every block that is not a fragment
passes `mypy --strict`. A block whose first line is `# NAME.py` is saved under that name,
so later blocks import it as the README tells a reader to.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.procs import ROOT, process_blocking

pytestmark = pytest.mark.slow

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.M | re.S)
NAMED = re.compile(r"# (\w+\.py)\n")


@dataclass(frozen=True)
class Block:
    doc: Path
    line: int
    code: str

    @property
    def where(self) -> str:
        return f"{self.doc.relative_to(ROOT)}:{self.line}"

    @property
    def fragment(self) -> bool:
        return self.code.startswith("# fragment")

    @property
    def file_name(self) -> str:
        named = NAMED.match(self.code)
        if named:
            return named.group(1)
        return f"{self.doc.stem.replace('-', '_')}_block_{self.line}.py"

    @property
    def kind(self) -> str:
        if self.file_name.startswith("test_"):
            return "test"
        if "asyncio.run(" in self.code or "mesh.run(" in self.code or "connect_sync(" in self.code:
            return "program"
        return "agent"


def blocks() -> Iterator[Block]:
    for doc in DOCS:
        text = doc.read_text()
        for found in BLOCK.finditer(text):
            yield Block(doc, text.count("\n", 0, found.start()) + 2, found.group(1))


def written(tmp: Path) -> list[Block]:
    """Every block that is not a fragment, saved in ``tmp``."""
    kept = [b for b in blocks() if not b.fragment]
    names = [b.file_name for b in kept]
    assert len(names) == len(set(names)), f"two blocks share a file name: {names}"
    for block in kept:
        (tmp / block.file_name).write_text(block.code)
    return kept


def test_the_docs_have_blocks_and_each_is_whole_or_says_it_is_a_fragment() -> None:
    found = list(blocks())
    assert len(found) >= 8
    for block in found:
        if block.fragment:
            continue
        try:
            compile(block.code, block.where, "exec")
        except SyntaxError as exc:
            pytest.fail(f"{block.where}: not a whole program ({exc}); start it with '# fragment'")


def test_every_block_passes_strict_mypy(tmp_path: Path) -> None:
    kept = written(tmp_path)
    out = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", "."],
        cwd=tmp_path,  # outside the repo: our own settings do not apply, as for a user
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    where = {b.file_name: b.where for b in kept}
    report = "\n".join(
        f"{where.get(line.split(':', 1)[0], '?')}: {line}" for line in out.stdout.splitlines()
    )
    assert out.returncode == 0, report + out.stderr


def test_every_block_runs_as_pasted(tmp_path: Path) -> None:
    kept = written(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    for block in kept:  # agents import on their own
        if block.kind == "agent":
            _run(
                [sys.executable, "-c", f"import runpy; runpy.run_path({block.file_name!r})"],
                tmp_path,
                env,
                block,
            )
    for block in kept:
        if block.kind == "test":
            _run(
                [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", block.file_name],
                tmp_path,
                env,
                block,
            )
    programs = [b for b in kept if b.kind == "program"]
    assert programs, "the docs show no whole program"
    counter = tmp_path / "counter.py"
    assert counter.exists(), "the README's tour saves its agent as counter.py"
    # The mesh the README's programs expect: `sessionmesh run counter.py`, on a free port.
    with process_blocking("run", str(counter), "--registry-port", "0") as (_, ready):
        env["SESSIONMESH_REGISTRY"] = str(ready["registry"])
        for block in programs:
            _run([sys.executable, block.file_name], tmp_path, env, block)


def _run(args: list[str], cwd: Path, env: dict[str, str], block: Block) -> None:
    out = subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0, f"{block.where} ({block.kind}) failed:\n{out.stdout}{out.stderr}"
