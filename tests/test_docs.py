"""The commands the README and the docs/ pages show: every `python train.py ...` (predict.py,
dataset.py, serve.py, tune.py; torchrun's train.py) in their shell blocks parses with the
script's own parser, so a renamed or removed flag fails here, not in a user's terminal."""

from __future__ import annotations

import re
import shlex

import pytest
from conftest import ROOT

import config
import dataset
import predict
import serve
import tune
from cli import UserError

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PARSERS = {
    "train.py": lambda args: config.check_flags(config.parse_args(args)),
    "predict.py": predict.parse_args,
    "dataset.py": lambda args: dataset.build_parser().parse_args(args),
    "serve.py": serve.parse_args,
    "tune.py": tune.parse_args,
}
SCRIPT = "|".join(map(re.escape, PARSERS))
COMMAND = re.compile(rf"(?:python|torchrun --nproc_per_node \d+) (?:\.\./)?({SCRIPT})\b(.*)")


def shell_lines(text: str) -> list[str]:
    """The lines of the page's ```bash blocks, continuation lines joined, comments dropped."""
    lines = []
    for block in re.findall(r"```(?:bash|sh)\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"(^|\s)#.*", "", line).strip()
            if line:
                lines.append(line)
    return lines


def documented_commands() -> list[tuple[str, str, list[str]]]:
    """(page, script, arguments) for every documented run of a product script."""
    found = []
    for page in PAGES:
        for line in shell_lines(page.read_text()):
            for part in re.split(r"&&|\|\||;|\|", line):
                match = COMMAND.search(part.strip())
                if match and "<" not in part:  # a <PLACEHOLDER> is the user's to fill in
                    args = [a.strip("[]") for a in shlex.split(match.group(2))]  # [optional]
                    args = [a for a in args if a not in ("", "...")]
                    found.append((page.relative_to(ROOT).as_posix(), match.group(1), args))
    return found


COMMANDS = documented_commands()


def test_the_pages_show_commands_of_every_script():
    assert {script for _, script, _ in COMMANDS} == set(PARSERS)
    assert ("README.md", "train.py", []) in COMMANDS  # the quick start's plain run


@pytest.mark.parametrize(
    "page, script, args", COMMANDS, ids=[f"{p}:{s} {' '.join(a)}" for p, s, a in COMMANDS]
)
def test_a_documented_command_parses(page, script, args):
    try:
        PARSERS[script](args)
    except SystemExit as e:
        assert e.code in (0, None)  # --help and --version exit 0
    except UserError as e:
        pytest.fail(f"{page}: python {script} {' '.join(args)}: {e}")
