"""Every shell command shown in README.md and in the notebooks parses with the real parser of its program.

vaehelpers / python -m vaehelpers lines: our cli.build_parser(); torchrun lines: torch.distributed.run's own
parser (get_args_parser), then the script's arguments with ours; papermill lines: papermill's click command,
with each -p NAME against the parameters papermill finds in that notebook. Commands are read from fenced and
indented code blocks and `!` lines of code cells, and mentions from inline code spans; a usage synopsis
([--flag VALUE], a|b, ...) and a mention need not be complete, but every subcommand, flag and choice in them must
exist, spelt out in full. The notebooks are read from their .ipynb JSON (markdown and code cells), which stays
beside any Jupytext .py pairing.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import io
import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

from vaehelpers.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
PROGRAMS = ("vaehelpers", "python -m vaehelpers", "torchrun", "python -m torch.distributed.run", "papermill")
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


@dataclass(frozen=True)
class Shown:
    where: str  # file (and cell)
    text: str  # the command, continuation lines joined
    complete: bool  # a command to run as shown (False: a synopsis or an inline mention)

    def __str__(self) -> str:
        return f"{self.where}: {self.text}"


def _starts_a_command(text: str) -> bool:
    return any(text == program or text.startswith(program + " ") for program in PROGRAMS)


def _is_synopsis(text: str) -> bool:
    return any(mark in text for mark in ("[", "|", "..."))


def commands_in_markdown(text: str, where: str) -> list[Shown]:
    """Commands in fenced and indented code blocks (continuations joined) and mentions in inline code spans."""
    found, in_fence, lines = [], False, text.splitlines()
    block: list[str] = []

    def flush() -> None:
        for command in _join(block):
            if _starts_a_command(command):
                found.append(Shown(where, command, not _is_synopsis(command)))
        block.clear()

    for line in lines:
        if line.lstrip().startswith("```"):
            if in_fence:
                flush()
            in_fence = not in_fence
            continue
        if in_fence:
            block.append(line)
        elif line.startswith("    ") and line.strip() and not line.lstrip().startswith(("-", "*")):
            block.append(line[4:])
        else:
            flush()
    flush()
    outside = re.sub(r"```.*?```", "", text, flags=re.S)
    for span in re.findall(r"`([^`]+)`", outside):
        span = " ".join(span.split())
        if _starts_a_command(span):
            found.append(Shown(where, span, False))
    return found


def _join(lines: list[str]) -> list[str]:
    """Lines with backslash continuations, and a synopsis's indented continuation lines, joined into one each."""
    joined: list[str] = []
    carry = False
    for line in lines:
        stripped = line.strip()
        if carry or (joined and line[:1].isspace() and stripped.startswith(("[", "--"))):
            joined[-1] = joined[-1] + " " + stripped.rstrip("\\").strip()
        else:
            joined.append(stripped.rstrip("\\").strip())
        carry = stripped.endswith("\\")
    return [line for line in joined if line]


def shown_commands() -> list[Shown]:
    found = commands_in_markdown((ROOT / "README.md").read_text(), "README.md")
    for path in NOTEBOOKS:
        for cell in json.loads(path.read_text())["cells"]:
            source = "".join(cell["source"])
            if cell["cell_type"] == "markdown":
                found += commands_in_markdown(source, f"{path.name}")
            else:  # shell lines of code cells: !vaehelpers ..., !torchrun ...
                for command in _join(
                    [line.strip()[1:] for line in source.splitlines() if line.strip().startswith("!")]
                ):
                    if _starts_a_command(command):
                        found.append(Shown(f"{path.name}", command, True))
    return found


# ----------------------------------------------------------------------------- the parsers


def _tokens(text: str) -> list[str]:
    return shlex.split(text, comments=True)


def _parse(parser: argparse.ArgumentParser, arguments: list[str]) -> argparse.Namespace:
    """parser.parse_args, with its usage error as an AssertionError (argparse exits on one)."""
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            return parser.parse_args(arguments)
    except SystemExit:
        raise AssertionError(errors.getvalue().strip().splitlines()[-1]) from None


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return next((action.choices for action in parser._actions if isinstance(action, argparse._SubParsersAction)), {})


def check_names(arguments: list[str]) -> None:
    """Every subcommand, --flag (spelt in full, no abbreviation) and choice among `arguments` exists in our parser."""
    parser, path = build_parser(), ["vaehelpers"]
    for index, raw in enumerate(arguments):
        token = raw.strip("[]")
        if token in _subparsers(parser):
            parser = _subparsers(parser)[token]
            path.append(token)
        elif token.startswith("--") and token != "--":
            flag = token.split("=")[0]
            action = parser._option_string_actions.get(flag)
            assert action is not None, f"`{' '.join(path)}` has no option {flag}"
            value = arguments[index + 1].strip("[]") if index + 1 < len(arguments) else ""
            if action.choices and value and not value.isupper() and not value.startswith("-"):
                assert set(value.split("|")) <= set(action.choices), f"{flag} {value}: choices are {action.choices}"


def check_vaehelpers(arguments: list[str], complete: bool) -> None:
    check_names(arguments)
    if complete:
        _parse(build_parser(), arguments)


def check_torchrun(arguments: list[str], complete: bool) -> None:
    from torch.distributed.run import get_args_parser

    parsed = _parse(get_args_parser(), arguments)
    assert parsed.module and parsed.training_script == "vaehelpers", "expected torchrun ... -m vaehelpers ..."
    assert not parsed.run_path, "torchrun took an argument of ours for its --run-path"
    check_vaehelpers(parsed.training_script_args, complete)


def check_papermill(arguments: list[str], complete: bool) -> None:
    import papermill
    from papermill.cli import papermill as command

    with command.make_context("papermill", list(arguments)) as context:  # click parses, nothing runs
        notebook, parameters = context.params["notebook_path"], context.params["parameters"]
    declared = papermill.inspect_notebook(str(ROOT / notebook))
    for name, _ in parameters:
        assert name in declared, f"{notebook} declares no parameter {name!r} (it has {sorted(declared)})"


def check(shown: Shown) -> None:
    tokens = _tokens(shown.text)
    if len(tokens) == 1 and not shown.complete:  # a mention of the program itself ("as `torchrun` would")
        return
    if tokens[:3] == ["python", "-m", "vaehelpers"]:
        check_vaehelpers(tokens[3:], shown.complete)
    elif tokens[0] == "vaehelpers":
        check_vaehelpers(tokens[1:], shown.complete)
    elif tokens[0] == "torchrun":
        check_torchrun(tokens[1:], shown.complete)
    elif tokens[:3] == ["python", "-m", "torch.distributed.run"]:
        check_torchrun(tokens[3:], shown.complete)
    else:
        check_papermill(tokens[1:], shown.complete)


SHOWN = shown_commands()


@pytest.mark.parametrize("shown", [pytest.param(item, id=str(item)[:120]) for item in SHOWN])
def test_shown_command_parses(shown):
    check(shown)


def test_the_commands_are_found():
    # the extraction itself: the README's torchrun lines (continued with \), its papermill example, notebook 04's
    texts = [str(item) for item in SHOWN]
    assert any(
        text.startswith("README.md: torchrun --nnodes 2") and "--run-dir /shared/runs/sd" in text for text in texts
    )
    assert "README.md: papermill notebooks/04_training.ipynb out.ipynb -p smoke True -p interactive False" in texts
    assert any(text.startswith("04_training.ipynb: torchrun") for text in texts)
    assert sum(text.startswith("README.md: vaehelpers ") for text in texts) >= 15


@pytest.mark.parametrize(
    "wrong",
    [
        Shown("x", "torchrun --nproc_per_node 2 -m vaehelpers train --data D --run R", True),  # --run-path's prefix
        Shown("x", "vaehelpers train --data D --run R --max-step 3", True),  # an abbreviation argparse would take
        Shown("x", "vaehelpers evaluate --modle M --data D", True),
        Shown("x", "vaehelpers convert SRC DEST --to onnx", True),
        Shown("x", "vaehelpers train [--preset tiny|huge]", False),
        Shown("x", "papermill notebooks/01_data.ipynb out.ipynb -p gpus 2", True),
    ],
)
def test_a_wrong_command_fails(wrong):
    with pytest.raises(AssertionError):
        check(wrong)


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[path.name for path in NOTEBOOKS])
def test_papermill_reads_every_parameter(notebook):
    # papermill skips a line it cannot parse (with a warning), and then -p NAME for it is "unknown"
    import papermill

    cell = next(c for c in json.loads(notebook.read_text())["cells"] if "parameters" in c["metadata"].get("tags", []))
    assigned = [node.targets[0].id for node in ast.parse("".join(cell["source"])).body if isinstance(node, ast.Assign)]
    assert sorted(papermill.inspect_notebook(str(notebook))) == sorted(assigned)
