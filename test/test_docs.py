"""Docs that are generated from code must match the code."""

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_parameter_reference_is_current():
    pytest.importorskip("rclpy")  # node modules declare parameters next to their rclpy code
    from rt2_ros.params_doc import render

    current = (REPO / "docs" / "parameters.md").read_text()
    assert current == render(), "docs/parameters.md is stale: run `.venv/bin/python -m rt2_ros.params_doc > " \
                                "docs/parameters.md`"


def test_readme_starts_with_the_two_commands():
    head = "\n".join((REPO / "README.md").read_text().splitlines()[:30])
    assert "make demo" in head and "make test" in head


def test_readme_safety_table_is_current():
    from rt2_ros.params import markdown_table
    from rt2_ros.safety import SAFETY_PARAMS

    assert markdown_table(SAFETY_PARAMS) in (REPO / "README.md").read_text(), \
        "README's safety parameter table is stale: paste markdown_table(SAFETY_PARAMS)"


# The option tables of the backend docs, each the markdown_table of the backend's OPTIONS.
BACKEND_DOC_TABLES = (("docs/compat_backends.md", "rt2_ros.backends.openvla_http", "OpenVLAHttpBackend"),
                      ("docs/compat_backends.md", "rt2_ros.backends.openpi", "OpenPIBackend"),
                      ("docs/compat_backends.md", "rt2_ros.backends.openai_compat", "OpenAICompatBackend"),
                      ("docs/local_backend.md", "rt2_ros.backends.local_hf", "LocalHFBackend"),
                      ("docs/grpc.md", "rt2_ros.backends.grpc_client", "GrpcBackend"))


@pytest.mark.parametrize(("doc", "module", "cls"), BACKEND_DOC_TABLES)
def test_backend_option_tables_are_current(doc, module, cls):
    import importlib

    from rt2_ros.params import markdown_table

    options = getattr(importlib.import_module(module), cls).OPTIONS
    assert markdown_table(options) in (REPO / doc).read_text(), \
        f"{doc}: the {cls} options table is stale: paste markdown_table({cls}.OPTIONS)"


# -- code blocks that run as written ---------------------------------------------------------------
# A fenced block preceded by the line `<!-- runnable -->` is run by test_runnable_blocks_run_as_written
# from the repository root: in a ```console block each `$ command` must print what the block shows
# (stdout and stderr together; a line `...` stands for any lines), in a ```bash block each command must
# exit 0. Only cheap commands are marked (--help, --check, rt2-tokens, python -m rt2_ros.params); the
# tools are the installed console scripts in .venv/bin/, which `make test` refreshes before pytest.
# Every block, runnable or not, may only name tools that exist, and calls them as .venv/bin/<tool>.
import os  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
RUNNABLE = "<!-- runnable -->"
VENV_OWN = {"python", "pip", "ruff"}  # the venv's own programs the docs may call
SHELL_LANGS = {"bash", "sh", "console", "shell", "text"}


def _console_scripts() -> set[str]:
    text = (REPO / "setup.py").read_text() + (REPO / "setup.cfg").read_text()
    return set(re.findall(r"^\s*\"?([\w-]+) = [\w.]+:\w+", text, re.M))


def _blocks(path: Path) -> list[tuple[int, str, bool, list[str]]]:
    """(line number, language, marked runnable, lines) of every fenced block of a markdown file."""
    out, lines = [], path.read_text().splitlines()
    i = 0
    while i < len(lines):
        fence = re.match(r"^(\s*)```(\w*)", lines[i])
        if not fence:
            i += 1
            continue
        indent, lang, start = fence.group(1), fence.group(2), i
        previous = next((ln.strip() for ln in reversed(lines[:i]) if ln.strip()), "")
        body = []
        i += 1
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i])
            i += 1
        out.append((start + 1, lang, previous == RUNNABLE, body))
        i += 1
    return out


def _commands(lang: str, body: list[str]) -> list[tuple[str, list[str]]]:
    """(command, the output lines shown after it) of a shell block; bash blocks show no output."""
    cmds: list[tuple[str, list[str]]] = []
    if lang in ("console", "text"):
        for line in body:
            if line.startswith("$ "):
                cmds.append((line[2:], []))
            elif cmds:
                cmds[-1][1].append(line)
        return cmds
    joined = re.sub(r"\\\n\s*", " ", "\n".join(body))
    return [(ln, []) for ln in joined.splitlines() if ln.strip() and not ln.strip().startswith("#")]


def _all_blocks():
    for path in DOCS:
        for line, lang, runnable, body in _blocks(path):
            yield f"{path.relative_to(REPO)}:{line}", lang, runnable, body


def test_docs_name_only_tools_that_exist_and_call_them_from_the_venv():
    scripts = _console_scripts()
    assert {"rt2-demo", "rt2-bringup", "rt2-tokens", "rt2-replay"} <= scripts
    problems = []
    for where, lang, _, body in _all_blocks():
        text = "\n".join(body)
        for tool in re.findall(r"\.venv/bin/([\w.-]+)", text):
            if tool not in scripts and tool not in VENV_OWN:
                problems.append(f"{where}: .venv/bin/{tool} is not a console script of setup.py")
        for tool in re.findall(r"(?<![\w/.-])(rt2-[a-z][a-z-]*)", text):
            if tool not in scripts:
                problems.append(f"{where}: {tool} is not a console script of setup.py")
        if lang not in SHELL_LANGS:
            continue
        for cmd, _ in _commands(lang, body):
            for part in re.split(r"&&|\|\||;|\||\$\(", cmd):
                words = part.split()
                if not words:
                    continue
                if words[0].startswith("rt2-"):
                    problems.append(f"{where}: `{words[0]}` only runs in an activated venv; write .venv/bin/{words[0]}")
                if words[0] in ("python", "python3") and "rt2_ros" in part:
                    problems.append(f"{where}: `{part.strip()}`: write .venv/bin/python")
    # Inline code too: `rt2-foo --bar` in prose must name a tool that exists.
    for path in DOCS:
        for tool in re.findall(r"`[^`\n]*?(?<![\w/.-])(rt2-[a-z][a-z-]*)", path.read_text()):
            if tool not in scripts:
                problems.append(f"{path.relative_to(REPO)}: inline `{tool}` is not a console script of setup.py")
    assert not problems, "\n".join(problems)


def _expected_regex(lines: list[str]) -> re.Pattern:
    while lines and not lines[-1].strip():
        lines = lines[:-1]
    parts = [r"(?:[^\n]*\n)*?" if ln.strip() == "..." else re.escape(ln.rstrip()) + r"\n" for ln in lines]
    return re.compile("".join(parts) + r"\Z")


def _runnable():
    return [(where, lang, body) for where, lang, runnable, body in _all_blocks() if runnable]


def test_some_blocks_are_runnable():
    marked = _runnable()
    assert len(marked) >= 5, marked
    assert all(lang in ("console", "bash") for _, lang, _ in marked), marked


@pytest.mark.parametrize(("where", "lang", "body"), _runnable(), ids=[r[0] for r in _runnable()])
def test_runnable_blocks_run_as_written(where, lang, body):
    for cmd, shown in _commands(lang, body):
        # stdout and stderr in one stream, unbuffered: in the order a terminal shows them
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONUNBUFFERED": "1"}
        out = subprocess.run(["bash", "-c", cmd], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, timeout=120, env=env)
        if lang == "bash":
            assert out.returncode == 0, f"{where}: `{cmd}` exited {out.returncode}:\n{out.stdout}"
            continue
        got = "".join(line.rstrip() + "\n" for line in out.stdout.splitlines())
        assert _expected_regex(shown).match(got), f"{where}: `{cmd}` printed\n{got}\nthe block shows\n" + \
            "\n".join(shown)


def test_params_yaml_blocks_are_valid_params_files(tmp_path):
    # Every params file the docs show (a ```yaml block with ros__parameters) is one the nodes accept:
    # node names, keys, types (model files they name need not exist here).
    pytest.importorskip("rclpy")
    from rt2_ros.nodes.bringup import check_params

    checked = 0
    for where, lang, _, body in _all_blocks():
        text = "\n".join(body)
        if lang != "yaml" or "ros__parameters" not in text:
            continue
        path = tmp_path / "block.yaml"
        path.write_text(text + "\n")
        try:
            check_params([path])
        except Exception as exc:
            raise AssertionError(f"{where}: {exc}") from None
        checked += 1
    assert checked >= 5
