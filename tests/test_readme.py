"""README's test command is what CI runs, exactly; the CLI it documents exists."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _readme_test_command() -> str:
    text = (REPO / "README.md").read_text()
    section = text.split("## Tests", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, "README.md's '## Tests' section has no ```bash block"
    lines = [ln for ln in block.group(1).splitlines() if ln.strip() and not ln.startswith("#")]
    return lines[0].strip()


def test_ci_runs_readme_test_command_exactly() -> None:
    command = _readme_test_command()
    ci_lines = [ln.strip() for ln in (REPO / ".ci" / "run").read_text().splitlines()]
    assert command in ci_lines, f"README's test command {command!r} is not a line of .ci/run"


def test_ci_installs_pinned_torch_before_the_package() -> None:
    ci = (REPO / ".ci" / "run").read_text()
    torch_at = ci.index("pip install torch==2.13.0")
    package_at = ci.index('pip install -e ".[test]"')
    assert torch_at < package_at
