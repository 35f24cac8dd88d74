"""The documentation site: every page in the nav exists, code on the guide pages runs, the
config-key table equals `metaopt train --help`, results pages are dated, nothing cites files
outside the project, and (when mkdocs is installed) the strict build passes."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
HELP_MARKER = "config keys (section.key  type  default  meaning):"

# Guide blocks that cannot run in a test, by a substring of the block, and why.
NOT_RUN = {
    "Omniglot(root": "needs the Omniglot data set and a GPU",
    "my_loader": "placeholder names for the reader's own data",
    'train("configs/sinusoid.yaml"': "a full training run",
}


def _load(name: str) -> object:
    spec = importlib.util.spec_from_file_location(name, DOCS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _nav_pages(node: object) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, list):
        return [p for item in node for p in _nav_pages(item)]
    if isinstance(node, dict):
        return [p for v in node.values() for p in _nav_pages(v)]
    return []


def _mkdocs_config() -> dict:
    # mkdocs.yml has no custom YAML tags, so safe_load reads it.
    return yaml.safe_load((REPO / "mkdocs.yml").read_text())


def test_mkdocs_is_strict_and_google_style() -> None:
    cfg = _mkdocs_config()
    assert cfg["strict"] is True
    options = cfg["plugins"][1]["mkdocstrings"]["handlers"]["python"]["options"]
    assert options["docstring_style"] == "google"


def test_every_nav_page_exists_and_every_page_is_in_the_nav() -> None:
    pages = _nav_pages(_mkdocs_config()["nav"])
    missing = [p for p in pages if not (DOCS / p).is_file()]
    assert not missing, f"nav pages missing from docs/: {missing}"
    on_disk = {str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md")}
    assert on_disk <= set(pages), f"pages not in the nav: {sorted(on_disk - set(pages))}"


def test_config_key_table_is_metaopt_train_help() -> None:
    out = subprocess.run([sys.executable, "-m", "metaopt", "train", "--help"], capture_output=True,
                         text=True, check=True, cwd=REPO).stdout
    expected = out.split(HELP_MARKER, 1)[1].strip("\n").rstrip()
    page = (DOCS / "guides" / "training.md").read_text()
    block = re.search(r"<!-- config-keys.*?-->\n```text\n(.*?)```", page, re.S)
    assert block, "docs/guides/training.md lost its config-keys block"
    assert block.group(1).rstrip() == expected, (
        "docs/guides/training.md's config-key table differs from `metaopt train --help`; "
        "paste the help's 'config keys' section into the block"
    )


def _python_blocks(path: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", path.read_text(), re.S | re.M)


GUIDES = [DOCS / "getting-started.md", *sorted((DOCS / "guides").glob("*.md"))]


@pytest.mark.parametrize("page", GUIDES, ids=lambda p: str(p.relative_to(DOCS)))
def test_guide_code_runs(page: Path) -> None:
    """Each page's Python blocks run in order in one namespace, loops cut to 3 iterations."""
    blocks = [b for b in _python_blocks(page) if not any(key in b for key in NOT_RUN)]
    if not blocks:
        pytest.skip("no runnable Python block on this page")
    if any("import higher" in b for b in blocks):
        pytest.importorskip("higher")
    if any("transformers" in b for b in blocks):
        pytest.importorskip("transformers")
    code = re.sub(r"range\(\d[\d_]*\)", "range(3)", "\n".join(blocks))
    exec(compile(code, str(page), "exec"), {"__name__": "docs_page"})


def test_docs_cite_nothing_outside_the_project() -> None:
    for page in [REPO / "README.md", *DOCS.rglob("*.md")]:
        # The config-keys block is the CLI's own help, checked against it above; what the
        # library prints is the library's business, not the prose's.
        text = re.sub(r"<!-- config-keys.*?-->\n```text\n.*?```", "", page.read_text(), flags=re.S)
        for needle in ("../shared", "DESIGN.md"):
            assert needle not in text, f"{page.relative_to(REPO)} mentions {needle!r}"


@pytest.mark.parametrize("page", sorted((DOCS / "results").glob("20*.md")), ids=lambda p: p.name)
def test_results_pages_say_when_where_and_how(page: Path) -> None:
    text = page.read_text()
    date = page.name[:10]
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", date), "results pages are named YYYY-MM-DD-<topic>.md"
    assert f"**Date:** {date}" in text
    for field in ("**Hardware:**", "**Software:**"):
        assert field in text, f"{page.name} has no {field} line"
    assert re.search(r"\*\*(Profile )?[Cc]ommands?:\*\*", text), f"{page.name} has no **Command:** line"
    assert (DOCS / "results" / "index.md").read_text().count(page.name) == 1, "list it on results/index.md"


def test_api_hook_finds_public_modules_only() -> None:
    hooks = _load("_hooks")
    modules = hooks.public_modules()  # type: ignore[attr-defined]
    assert {"metaopt", "metaopt.maml", "metaopt.optim", "metaopt.optim.adafactor", "metaopt.stats"} <= set(modules)
    assert not [m for m in modules if "._" in m or m.startswith("_")]


def test_griffe_extension_rewrites_what_griffe_cannot_read() -> None:
    pytest.importorskip("griffe")  # the docs extra; CI installs it after the tests
    ext = _load("_griffe_examples")
    doc = (
        "Do it.\n\n    Args:\n        a: first.\n        b, c: shared\n            text.\n\n"
        "    Example:\n        >>> f(:func:`~metaopt.maml.default_vectorize`)\n"
    )
    text = ext._EXAMPLE.sub(r"\1Examples:", doc)  # type: ignore[attr-defined]
    text = ext._ROLE.sub(r"`\1`", text)  # type: ignore[attr-defined]
    text = ext._split_multi_params(text)  # type: ignore[attr-defined]
    assert "    Examples:\n" in text and "Example:\n" not in text
    assert "b: shared\n            text.\n        c: shared\n            text.\n" in text
    assert "`metaopt.maml.default_vectorize`" in text and ":func:" not in text


def test_strict_build() -> None:
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    with tempfile.TemporaryDirectory() as site:
        r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", site],
                           capture_output=True, text=True, cwd=REPO, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
        assert r.returncode == 0, r.stderr[-3000:]
        assert (Path(site) / "api" / "maml" / "index.html").is_file()
