"""Griffe extension: render backpack_tn's Sphinx-flavoured docstrings as Markdown.

The package's docstrings follow the Google style but use three reStructuredText
constructs that Markdown does not know. This extension rewrites them before
mkdocstrings parses the docstrings:

- cross-reference roles: ``:func:`use_tn``` becomes ``[`use_tn`][use_tn]`` (an
  autorefs link, resolved in the object's scope) and ``:class:`~a.b.C``` becomes
  ``[`C`][a.b.C]``;
- simple tables (``=====  =====`` borders) become Markdown tables;
- a paragraph ending in ``::`` (which introduces an indented literal block) ends in
  ``:`` instead; the indented block is a code block in Markdown as well;
- ``#:`` comments above a module attribute become its docstring, as in Sphinx
  autodoc, so constants such as ``STRATEGIES`` are documented.

Docstrings stay untouched in the source: this only changes how the site shows them.
"""

from __future__ import annotations

import re

from griffe import Attribute, Docstring, Extension, Object

_ROLE = re.compile(r":(?:py:)?(?:func|class|mod|data|meth|attr|obj|exc):`(~?)([^`]+)`")
_BORDER = re.compile(r"^=+(?: +=+)+ *$")
_LITERAL_MARKER = re.compile(r"(?<=\S)::$", re.MULTILINE)


def _role_to_link(match: re.Match) -> str:
    """Turn one Sphinx role into an autorefs link.

    Args:
        match: Match of ``_ROLE``.

    Returns:
        The Markdown link.
    """
    short, target = match.group(1), match.group(2).strip()
    title = target.rsplit(".", 1)[-1] if short else target
    return f"[`{title}`][{target}]"


def _columns(border: str) -> list[int]:
    """Start of every column of a simple table.

    Args:
        border: A border line such as ``"=====  ======"``.

    Returns:
        The character offset of each column.
    """
    return [m.start() for m in re.finditer(r"=+", border)]


def _cells(line: str, starts: list[int]) -> list[str]:
    """Split a table row at the column starts.

    Args:
        line: A row of the table.
        starts: Column offsets from ``_columns``.

    Returns:
        The stripped cell texts, with ``|`` escaped.
    """
    ends = [*starts[1:], None]
    return [
        line[a:b].strip().replace("|", r"\|") for a, b in zip(starts, ends, strict=True)
    ]


def _tables_to_markdown(text: str) -> str:
    """Rewrite every reStructuredText simple table in ``text`` as a Markdown table.

    Args:
        text: Docstring text.

    Returns:
        The text with Markdown tables.
    """
    lines = text.splitlines()
    out: list[str] = []
    pos = 0
    while pos < len(lines):
        if not _BORDER.match(lines[pos]):
            out.append(lines[pos])
            pos += 1
            continue
        borders = [pos]
        end = pos + 1
        while end < len(lines) and len(borders) < 3 and lines[end].strip():
            if _BORDER.match(lines[end]):
                borders.append(end)
            end += 1
        if len(borders) != 3:  # not a table with a header: keep as is
            out.append(lines[pos])
            pos += 1
            continue
        starts = _columns(lines[pos])
        header = [_cells(line, starts) for line in lines[pos + 1 : borders[1]]]
        rows = [_cells(line, starts) for line in lines[borders[1] + 1 : borders[2]]]
        head = [" ".join(parts).strip() for parts in zip(*header, strict=True)]
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "---|" * len(head))
        out.extend("| " + " | ".join(row) + " |" for row in rows)
        pos = borders[2] + 1
    return "\n".join(out)


def _rewrite(text: str) -> str:
    """Apply all rewrites to a docstring (roles first: they may end a line).

    Args:
        text: Docstring text.

    Returns:
        Markdown text.
    """
    text = _LITERAL_MARKER.sub(":", _ROLE.sub(_role_to_link, text))
    return _tables_to_markdown(text)


def _comment_docstring(attribute: Attribute) -> str | None:
    """The ``#:`` comment lines right above an attribute, if any.

    Args:
        attribute: A module or class attribute.

    Returns:
        The comment text without the ``#:`` markers, or ``None``.
    """
    if attribute.lineno is None:
        return None
    try:
        lines = attribute.lines_collection[attribute.filepath]
    except (KeyError, TypeError):
        return None
    comments: list[str] = []
    pos = attribute.lineno - 2
    while 0 <= pos < len(lines) and lines[pos].lstrip().startswith("#:"):
        comments.insert(0, lines[pos].lstrip()[2:].strip())
        pos -= 1
    return "\n".join(comments) or None


class RstCompat(Extension):
    """Rewrite reStructuredText constructs in docstrings as Markdown."""

    def on_instance(self, *, obj: Object, **kwargs) -> None:
        """Rewrite the docstring of every loaded object.

        Args:
            obj: The object griffe just loaded.
            **kwargs: Other arguments griffe passes (unused).
        """
        if obj.is_alias:
            return
        if obj.docstring is None and isinstance(obj, Attribute):
            comment = _comment_docstring(obj)
            if comment:
                obj.docstring = Docstring(comment, parent=obj)
        if obj.docstring is not None:
            obj.docstring.value = _rewrite(obj.docstring.value)
