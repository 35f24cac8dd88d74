"""README.md: the two set-up commands come first, CI runs the test command exactly, the
quickstart runs, and the README stays short (reference material lives in docs/)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
CI = (REPO / ".ci" / "run").read_text()

MAIN_RUN = 'pip install torch==2.13.0 && pip install -e ".[plot]" && metaopt train configs/sinusoid.yaml'
TEST_RUN = 'pip install torch==2.13.0 && pip install -e ".[test]" && python -m pytest -q -n 2 tests'
MAX_LINES = 200


def _bash_blocks(text: str) -> list[list[str]]:
    """The non-empty, non-comment lines of each ```bash block, in order."""
    blocks = re.findall(r"^```bash\n(.*?)^```", text, re.S | re.M)
    return [[ln.strip() for ln in b.splitlines() if ln.strip() and not ln.lstrip().startswith("#")] for b in blocks]


def test_first_bash_block_is_the_two_setup_commands() -> None:
    blocks = _bash_blocks(README)
    assert blocks, "README.md has no ```bash block"
    assert blocks[0] == [MAIN_RUN, TEST_RUN], f"README's first bash block is {blocks[0]!r}"


def test_setup_commands_come_before_any_other_section() -> None:
    first_block = README.index("```bash")
    first_section = README.index("\n## ")
    assert first_block < first_section, "the set-up commands must precede the first '## ' section"


def test_ci_runs_readme_test_command_exactly() -> None:
    ci_lines = [ln.strip() for ln in CI.splitlines()]
    assert TEST_RUN in ci_lines, f"README's test command {TEST_RUN!r} is not a line of .ci/run"


def test_ci_keeps_strict_mode_and_a_failing_install_stops_it() -> None:
    assert "set -euo pipefail" in CI
    # `set -e` ignores a failure before the last `&&` of a list (pip install torch failing
    # would fall through to the next line); CI runs the line in a subshell so it stops.
    lines = [ln.strip() for ln in CI.splitlines()]
    at = lines.index(TEST_RUN)
    assert lines[at - 1] == "(" and lines[at + 1] == ")", "run README's test command inside ( ... )"


def test_ci_builds_the_docs_strictly_after_the_tests() -> None:
    tests_at = CI.index(TEST_RUN)
    docs_install = CI.index('pip install -e ".[docs]"')
    build = re.search(r"^.*mkdocs build --strict -d \S+.*$", CI, re.M)
    assert build is not None, ".ci/run must run `mkdocs build --strict -d <dir>`"
    assert tests_at < docs_install < build.start()


def test_the_two_commands_install_pinned_torch_before_the_package() -> None:
    for command in (MAIN_RUN, TEST_RUN):
        steps = [s.strip() for s in command.split("&&")]
        assert steps[0] == "pip install torch==2.13.0"
        assert steps[1].startswith("pip install -e ")


def test_readme_is_short() -> None:
    n = len(README.splitlines())
    assert n <= MAX_LINES, f"README.md has {n} lines; keep it <= {MAX_LINES} (reference material goes to docs/)"


def test_readme_cites_nothing_outside_the_project() -> None:
    for needle in ("../shared", "DESIGN.md", "development VM", "no GPU has been lent"):
        assert needle not in README, f"README.md mentions {needle!r}"


def test_readme_links_resolve() -> None:
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README):
        if "://" in target:
            continue
        assert (REPO / target).exists(), f"README links to missing {target}"


def test_readme_commands_exist() -> None:
    """Each `metaopt <sub>` the README shows is a subcommand of the CLI."""
    subs = set(re.findall(r"^metaopt (\w+)", README, re.M)) | set(re.findall(r"`metaopt (\w+)", README))
    out = subprocess.run([sys.executable, "-m", "metaopt", "--help"], capture_output=True, text=True, check=True).stdout
    for sub in sorted(subs):
        assert re.search(rf"^\s+{sub}\s", out, re.M), f"README shows `metaopt {sub}` but the CLI has no such command"


def test_main_run_config_exists() -> None:
    config = shlex.split(MAIN_RUN.split("&&")[-1])[-1]
    assert (REPO / config).is_file()


def test_quickstart_runs() -> None:
    """The README's Python blocks run as written, with every loop cut to 3 iterations."""
    blocks = re.findall(r"^```python\n(.*?)^```", README, re.S | re.M)
    assert blocks, "README.md has no ```python block"
    code = re.sub(r"range\(\d[\d_]*\)", "range(3)", "\n".join(blocks))
    assert "backward=True" in code, "the quickstart teaches the lean recipe meta_loss(batch, backward=True)"
    exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
