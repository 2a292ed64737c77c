"""The curl examples of the README and docs/ run as written, from the repository root, against
a real server on the shipped weights; and every answer they show is the answer its command gets
(model, labels, operating point and executed MACs; probabilities to 0.01)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.service_helpers import ThreadedServer

ROOT = Path(__file__).resolve().parents[2]
PAGES = {path.relative_to(ROOT): path.read_text()
         for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]}

pytestmark = pytest.mark.skipif(not shutil.which("curl"), reason="needs curl")


def curl_commands(text: str) -> list[tuple[int, str]]:
    """(offset, command) of every indented `curl ... localhost:8000...` line, continuation lines
    (a trailing backslash) joined, the trailing comment dropped."""
    found, lines, offset = [], text.split("\n"), 0
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("    curl ") and "localhost:8000" in "".join(lines[i : i + 4]):
            command = line.strip()
            while command.endswith("\\"):
                i += 1
                command = command[:-1] + " " + lines[i].strip()
            found.append((offset, re.sub(r"\s+#[^\"']*$", "", command)))
        offset += len(line) + 1
        i += 1
    return found


def answers(text: str) -> list[tuple[int, dict]]:
    """(offset, answer) of every JSON block that shows a predict answer."""
    return [(m.start(), json.loads(m.group(1))) for m in re.finditer(r"```json\n(.*?)\n```", text, re.S)
            if '"predictions"' in m.group(1) and "…" not in m.group(1)]


@pytest.fixture(scope="module")
def server():
    with ThreadedServer(str(ROOT / "weights")) as s:
        yield s


def run(command: str, url: str) -> dict:
    done = subprocess.run(["bash", "-c", command.replace("localhost:8000", url.removeprefix("http://"))],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout, (command, done.stderr)
    return json.loads(done.stdout)


def test_every_curl_example_runs_as_written(server):
    commands = [c for text in PAGES.values() for _, c in curl_commands(text)]
    assert len(commands) >= 6 and curl_commands(PAGES[Path("README.md")])
    for command in commands:
        answer = run(command, server.url)
        assert "error" not in answer, (command, answer)


@pytest.mark.parametrize("page", sorted(p for p, text in PAGES.items() if answers(text)), ids=str)
def test_every_answer_shown_is_the_answer_its_command_gets(server, page):
    commands, shown = curl_commands(PAGES[page]), answers(PAGES[page])
    for offset, expected in shown:
        command = max((c for c in commands if c[0] < offset), key=lambda c: c[0])[1]
        got = run(command, server.url)
        assert got["model"] == expected["model"], command
        for want, have in zip(expected["predictions"], got["predictions"], strict=True):
            assert [t["label"] for t in want["top_k"]] == [t["label"] for t in have["top_k"]], command
            for a, b in zip(want["top_k"], have["top_k"], strict=True):
                assert a["probability"] == pytest.approx(b["probability"], abs=0.01), command
            assert want["budget"] == have["budget"], command
            assert want["cost"]["executed_macs"] == have["cost"]["executed_macs"], command


def test_the_readme_shows_an_answer():
    assert answers(PAGES[Path("README.md")])
