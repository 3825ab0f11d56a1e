"""A griffe extension for the API pages: the docstrings' reStructuredText habits as Markdown.

The docstrings cross-reference with Sphinx roles (``:class:`~optimizers.LayerwiseMixture```), introduce
literal blocks with a trailing ``::`` and draw a few simple tables (``=====  =====`` borders). mkdocstrings
reads docstrings as Markdown, where all three would show as written (a border even as a heading's underline).
Here a role becomes a code span (its last part when the target starts with ``~``, as Sphinx shows it), ``::``
becomes ``:`` before the indented block (which Markdown renders as code already), and a simple table becomes
a Markdown table.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|data|attr|exc|obj|const):`(~?)([^`]+)`")
LITERAL_BLOCK = re.compile(r"(\S)::$", re.MULTILINE)
BORDER = re.compile(r"^=+(?: +=+)+\s*$")


def _cells(line: str, starts: list[int]) -> list[str]:
    """A table row cut at the columns' start positions (the last column runs to the end of the line)."""
    return [line[a:b].strip() for a, b in zip(starts, [*starts[1:], None])]


def _table(rows: list[str], starts: list[int]) -> list[str]:
    """A simple table's rows (header first) as Markdown; a row whose first cell is empty continues the last."""
    table: list[list[str]] = []
    for line in rows:
        cells = _cells(line, starts)
        if table and not cells[0]:
            table[-1] = [f"{old} {new}".strip() for old, new in zip(table[-1], cells)]
        else:
            table.append(cells)
    lines = ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in table]
    return [lines[0], "|" + "---|" * len(starts), *lines[1:]]


def simple_tables(text: str) -> str:
    """``text`` with every reStructuredText simple table (three borders: top, below the header, bottom) as
    a Markdown table; anything else is left as it is."""
    lines, out, i = text.split("\n"), [], 0
    while i < len(lines):
        borders = [j for j in range(i, len(lines)) if BORDER.match(lines[j])][:3] if BORDER.match(lines[i]) else []
        if len(borders) == 3 and borders[1] == i + 2 and all(lines[j].strip() for j in range(i, borders[2])):
            starts = [m.start() for m in re.finditer(r"=+", lines[i])]
            out += _table([lines[i + 1], *lines[i + 3:borders[2]]], starts)
            i = borders[2] + 1
        else:
            out.append(lines[i])
            i += 1
    return "\n".join(out)


def markdown(text: str) -> str:
    """``text`` with Sphinx roles as code spans, literal-block markers as colons and simple tables in Markdown."""
    text = ROLE.sub(lambda m: f"`{m.group(2).rsplit('.', 1)[-1] if m.group(1) else m.group(2)}`", text)
    return simple_tables(LITERAL_BLOCK.sub(r"\1:", text))


class SphinxRolesAsMarkdown(griffe.Extension):
    """Rewrite every docstring as it is loaded."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        del kwargs
        if obj.docstring is not None:
            obj.docstring.value = markdown(obj.docstring.value)
