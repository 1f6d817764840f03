"""Examples in the docs are real: the shown output is what the command prints."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from bulkhead.cli.main import main

ROOT = Path(__file__).resolve().parents[2]


def shell_examples(doc: Path) -> list[tuple[str, str]]:
    """(`$ command`, output) pairs from the fenced blocks of a doc."""
    blocks = re.findall(r"```\n(\$ .*?)```", doc.read_text(), flags=re.S)
    out = []
    for block in blocks:
        command, _, output = block.partition("\n")
        out.append((command[2:], output))
    return out


@pytest.mark.parametrize(("command", "output"), shell_examples(ROOT / "docs" / "policy.md"))
def test_policy_doc_examples(command: str, output: str, monkeypatch: pytest.MonkeyPatch,
                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(ROOT)
    argv = shlex.split(command)
    assert argv[0] == "bulkhead"
    main(argv[1:])
    assert capsys.readouterr().out == output


def test_the_tests_docs_name_exist() -> None:
    """Every `test_...` a doc cites as holding a promise is a test (or test file) here."""
    sources = "\n".join(p.read_text() for p in (ROOT / "agent" / "tests").glob("test_*.py"))
    files = {p.name for p in (ROOT / "agent" / "tests").glob("test_*.py")}
    for doc in (ROOT / "docs" / "server.md", ROOT / "docs" / "policy.md"):
        for name in set(re.findall(r"\btest_\w+(?:\.py)?", doc.read_text())):
            if name.endswith(".py"):
                assert name in files, f"{doc.name} cites {name}, which does not exist"
            else:
                assert re.search(rf"def {name}\(", sources), \
                    f"{doc.name} cites {name}, which is not a test"
