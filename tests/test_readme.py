"""The README runs as written: every ```python block, pasted into a fresh interpreter.

Each block runs in its own namespace (so a block that leans on another's names fails here as it
would when pasted), all in one process (so jit caches and the loaded embedded model are paid
once), with the working directory a temporary folder (its `runs/...` paths land there).

A block that needs weights this machine does not have is marked just before its fence:

    <!-- readme-test: expects ModelNotFoundError: 'flux-dev' is not on this machine -->

and must raise an exception of that class (by name, anywhere in its MRO) whose message holds
the text after the second colon. Every `.venv/bin/pqjax SUB ...` line of the ```bash blocks must
name a subcommand whose `--help` exits 0 and lists every `--option` the line uses.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
FENCE = re.compile(
    r"(?:<!--\s*readme-test:\s*(?P<marker>.*?)\s*-->\n)?```(?P<lang>\w+)\n(?P<code>.*?)^```",
    re.S | re.M,
)
EXPECTS = re.compile(r"expects\s+(?P<exc>\w+)(?::\s*(?P<msg>.*))?$")


def blocks(lang: str) -> list[tuple[int, str | None, str]]:
    """(line number, marker or None, code) of every ```lang block of the README."""
    text = README.read_text()
    return [
        (text.count("\n", 0, m.start("code")) + 1, m.group("marker"), m.group("code"))
        for m in FENCE.finditer(text)
        if m.group("lang") == lang
    ]


PYTHON = blocks("python")
BASH = blocks("bash")


def test_the_readme_has_the_blocks_this_test_reads():
    assert len(PYTHON) >= 5, PYTHON
    assert any(marker for _, marker, _ in PYTHON), "no block marked as needing real weights"
    for line, marker, _ in PYTHON:
        assert marker is None or EXPECTS.match(marker), f"README.md:{line}: bad marker {marker!r}"
    assert any(".venv/bin/pqjax" in code for _, _, code in BASH)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("readme")


@pytest.mark.parametrize("line, marker, code", PYTHON, ids=[f"line{b[0]}" for b in PYTHON])
def test_python_block_runs_as_written(line, marker, code, workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    compiled = compile(code, f"README.md:{line}", "exec")
    namespace: dict = {"__name__": "__main__"}
    expected = EXPECTS.match(marker) if marker else None
    if expected is None:
        exec(compiled, namespace)
        return
    with pytest.raises(Exception) as info:
        exec(compiled, namespace)
    names = [cls.__name__ for cls in type(info.value).__mro__]
    assert expected["exc"] in names, f"README.md:{line} raised {info.value!r}"
    assert (expected["msg"] or "") in str(info.value)


def _cli_lines() -> list[tuple[int, list[str]]]:
    out = []
    for line, _, code in BASH:
        for i, row in enumerate(code.splitlines()):
            row = row.split(" #")[0].strip()
            if row.startswith(".venv/bin/pqjax"):
                out.append((line + i, shlex.split(row)[1:]))
    return out


@pytest.mark.parametrize("line, argv", _cli_lines(), ids=lambda v: str(v)[:30])
def test_bash_cli_lines_are_valid(line, argv):
    from pqjax import cli

    help_text = io.StringIO()
    with contextlib.redirect_stdout(help_text), pytest.raises(SystemExit) as e:
        cli.main([argv[0], "--help"])
    assert e.value.code == 0, f"README.md:{line}: `pqjax {argv[0]} --help` exited {e.value.code}"
    for opt in (a.split("=")[0] for a in argv[1:] if a.startswith("--")):
        assert re.search(rf"(?<![\w-]){re.escape(opt)}(?![\w-])", help_text.getvalue()), (
            f"README.md:{line}: `pqjax {argv[0]}` has no option {opt}"
        )
