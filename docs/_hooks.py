"""MkDocs hook: the API reference covers every public module, even ones added later.

The pages under ``docs/api/`` group the modules by topic with ``::: metaopt.x`` blocks. A
public module (no leading underscore in its dotted path) that none of them names gets a
generated page, ``api/more.md``, listed last under "API reference" in the navigation, so a
new module is documented (and its docstrings checked by the strict build) the day it lands;
move it to a topic page by naming it there.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # mkdocs is imported where it is used, so tests can load this file without it
    from mkdocs.config.defaults import MkDocsConfig
    from mkdocs.structure.files import Files

_ROOT = Path(__file__).resolve().parents[1]
_DIRECTIVE = re.compile(r"^:::\s+([\w.]+)", re.MULTILINE)
_MORE = "api/more.md"


def public_modules(package: str = "metaopt") -> list[str]:
    """Dotted names of the package's public modules, from the source tree (nothing imported)."""
    base = _ROOT / package
    names = []
    for path in sorted(base.rglob("*.py")):
        parts = [package, *path.relative_to(base).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if any(p.startswith("_") for p in parts):  # private modules and __main__
            continue
        names.append(".".join(parts))
    return names


def documented_modules(docs_dir: Path) -> set[str]:
    """Every ``::: name`` target in the hand-written API pages."""
    found: set[str] = set()
    for page in (docs_dir / "api").glob("*.md"):
        found.update(_DIRECTIVE.findall(page.read_text()))
    return found


def _missing(config: MkDocsConfig) -> list[str]:
    documented = documented_modules(Path(config["docs_dir"]))
    return [m for m in public_modules() if m not in documented]


def on_config(config: MkDocsConfig, **kwargs: Any) -> MkDocsConfig:
    if _missing(config):
        for section in config["nav"]:
            if isinstance(section, dict) and "API reference" in section:
                section["API reference"].append({"More modules": _MORE})
    return config


def on_files(files: Files, config: MkDocsConfig, **kwargs: Any) -> Files:
    from mkdocs.structure.files import File

    missing = _missing(config)
    if missing:
        blocks = "\n".join(f"::: {m}\n" for m in missing)
        text = (
            "# More modules\n\nPublic modules not yet placed on a topic page of this reference.\n\n"
            + blocks
        )
        files.append(File.generated(config, _MORE, content=text))
    return files
