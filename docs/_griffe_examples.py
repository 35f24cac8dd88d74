"""Griffe extension for the API reference: spellings in metaopt's docstrings griffe does not read.

1. metaopt's docstrings title their runnable example ``Example:`` (singular). Griffe's
   Google parser knows only ``Examples:`` as a section; the singular becomes an admonition
   whose ``>>>`` lines are rendered as a Markdown paragraph (brackets in ``p["w"][0, 0]``
   even turn into broken cross-references). It is renamed before parsing, so every example
   is a highlighted doctest block.
2. An ``Args:`` item may document several parameters at once (``val_data, test_data: ...``,
   as NumPy style allows); griffe would report one unknown parameter named
   ``"val_data, test_data"``. The item is repeated for each name.
3. Sphinx roles (``:class:`Adafactor```, ``:func:`~metaopt.maml.default_vectorize```) are
   not Markdown; they become inline code (Markdown shows the role's text literally).

Used by mkdocs.yml only (``exclude_docs`` keeps it out of the built site).
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_EXAMPLE = re.compile(r"^(\s*)Example:\s*$", re.MULTILINE)
_ARGS = re.compile(r"^(\s*)(Args|Arguments|Parameters):\s*$")
_ROLE = re.compile(r":(?:mod|class|func|meth|data|attr|exc|obj):`~?([^`]+)`")
_MULTI = re.compile(r"^(\s+)(\w+(?:\s*,\s*\w+)+):(.*)$")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _split_multi_params(text: str) -> str:
    lines, out, i = text.split("\n"), [], 0
    in_args, section_indent = False, 0
    while i < len(lines):
        line = lines[i]
        if _ARGS.match(line):
            in_args, section_indent = True, _indent(line)
        elif line.strip() and _indent(line) <= section_indent:
            in_args = False  # the next section (or the end of Args) at the same indent
        m = _MULTI.match(line) if in_args else None
        if m is None:
            out.append(line)
            i += 1
            continue
        indent, names, first = m.group(1), m.group(2), m.group(3)
        body = [first]
        i += 1
        while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > len(indent)):
            body.append("\n" + lines[i])
            i += 1
        trailing = 0
        while len(body) > 1 and not body[-1].strip():  # blank lines after the item stay once
            body.pop()
            trailing += 1
        for name in re.split(r"\s*,\s*", names):
            out.append(f"{indent}{name}:{''.join(body)}")
        out.extend([""] * trailing)
    return "\n".join(out)


class ExampleSections(griffe.Extension):
    """Rename ``Example:``, split multi-name ``Args:`` items, turn Sphinx roles into code."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            text = _EXAMPLE.sub(r"\1Examples:", obj.docstring.value)
            text = _ROLE.sub(r"`\1`", text)
            obj.docstring.value = _split_multi_params(text)
