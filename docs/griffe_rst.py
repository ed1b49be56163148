"""Griffe extension: curvext's reST-flavoured docstrings, read as Markdown.

curvext's docstrings are Google style with a few reStructuredText habits
(Sphinx roles, ``.. math::``, doctests, ``::`` literal blocks, ``#:`` comments
documenting attributes). mkdocstrings renders docstrings as Markdown, so this
extension (loaded by mkdocs.yml for the API reference only; it never touches
the source files) rewrites, once the package is loaded:

- ``:math:`x``` to ``\\(x\\)`` and ``.. math::`` blocks to ``\\[ ... \\]``
  (typeset by pymdownx.arithmatex and MathJax);
- ``:class:`~a.b.C``` (``:func:``, ``:meth:``, ``:attr:``, ``:mod:``, ...) to an
  *optional* cross-reference: a link where the object is in the API reference,
  plain code otherwise (never a warning, so ``mkdocs build --strict`` holds);
- doctests (``>>>``) to fenced ``pycon`` blocks (Markdown would read ``>>>`` as
  quotes and ``x[0][1]`` as a reference link), without ``# doctest:`` flags;
- a paragraph ending in ``::`` to one ending in ``:`` (the indented block after
  it is a code block in Markdown too);
- an entry documenting several parameters (``a, b, c: As for X``, the names
  possibly over two lines) to one entry per parameter, which the Google
  parser can read;
- ``#:`` comments above an attribute without a docstring to its docstring.
"""

from __future__ import annotations

import html
import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(class|func|meth|attr|mod|data|exc|obj|const):`([^`]+)`")
_MATH_ROLE = re.compile(r":math:`([^`]+)`")
_MATH_DIRECTIVE = re.compile(r"^(\s*)\.\. math::[ \t]*(.*)$")
_DOCTEST = re.compile(r"^(\s*)>>>( |$)")
_DOCTEST_FLAGS = re.compile(r"\s*#\s*doctest:.*$")
_NAMES_LINE = re.compile(r"^\s*\*{0,2}\w+(?:,\s*\*{0,2}\w+)*,\s*$")
_PARAM_SECTION = re.compile(
    r"^(\s*)(?:Args|Arguments|Parameters|Attributes|Keyword Args|Other Parameters):\s*$"
)
_GROUPED_ITEM = re.compile(r"^(\s*)(\*{0,2}\w+(?:,\s*\*{0,2}\w+)+):\s*(.*)$")
_FENCE = re.compile(r"^\s*(```|~~~)")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _math_blocks(lines: list[str]) -> list[str]:
    """``.. math::`` (content on its line and/or indented below) to ``\\[ ... \\]``."""
    out: list[str] = []
    i = 0
    while i < len(lines):
        match = _MATH_DIRECTIVE.match(lines[i])
        if not match:
            out.append(lines[i])
            i += 1
            continue
        base = len(match.group(1))
        body = [match.group(2).strip()] if match.group(2).strip() else []
        i += 1
        while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > base):
            body.append(lines[i].strip())
            i += 1
        while body and not body[-1]:
            body.pop()
        tex = "\n".join(line for line in body if line)
        if "&" in tex or "\\\\" in tex:
            tex = "\\begin{aligned}\n" + tex + "\n\\end{aligned}"
        pad = " " * base
        if out and out[-1].strip() and _indent(out[-1]) >= base:
            out.append("")
        out.extend([pad + "\\[", *(pad + line for line in tex.split("\n")), pad + "\\]", ""])
    return out


def _doctests(lines: list[str]) -> list[str]:
    """Runs of doctest lines (prompts and expected output) to fenced pycon blocks."""
    out: list[str] = []
    in_fence = False
    i = 0
    while i < len(lines):
        line = lines[i]
        if _FENCE.match(line):
            in_fence = not in_fence
        match = None if in_fence else _DOCTEST.match(line)
        if not match:
            out.append(line)
            i += 1
            continue
        base = len(match.group(1))
        block = []
        while i < len(lines) and lines[i].strip() and _indent(lines[i]) >= base:
            block.append(_DOCTEST_FLAGS.sub("", lines[i][base:]))
            i += 1
        pad = " " * base
        if out and out[-1].strip() and _indent(out[-1]) >= base:
            out.append("")  # not after a section title ("Example:"), which needs its block next
        out.extend([pad + "```pycon", *(pad + line for line in block), pad + "```"])
        if i < len(lines) and lines[i].strip():
            out.append("")
    return out


def _grouped_params(lines: list[str]) -> list[str]:
    """Entries documenting several parameters at once, split into one entry each.

    In ``Args:``/``Attributes:`` sections, ``a, b,`` + ``    c: As for X.`` (or
    ``a, b, c: As for X.`` on one line) becomes ``a: As for X.``, ``b: ...``,
    ``c: ...``, so that each parameter gets its row, type and default.
    """
    out: list[str] = []
    i = 0
    section = None  # indentation of the current section header
    while i < len(lines):
        line = lines[i]
        header = _PARAM_SECTION.match(line)
        if header:
            section = len(header.group(1))
            out.append(line)
            i += 1
            continue
        if section is not None and line.strip() and _indent(line) <= section:
            section = None
        if section is None or not line.strip():
            out.append(line)
            i += 1
            continue
        item = line
        i += 1
        while _NAMES_LINE.match(item) and i < len(lines) and lines[i].strip():
            item = item.rstrip() + " " + lines[i].strip()
            i += 1
        grouped = _GROUPED_ITEM.match(item)
        if not grouped:
            out.append(item)
            continue
        pad, names, description = grouped.groups()
        body = [description]
        while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > len(pad)):
            body.append(lines[i])
            i += 1
        while body and not body[-1].strip():
            body.pop()
            i -= 1
        for name in re.split(r",\s*", names):
            out.append(f"{pad}{name}: {body[0]}")
            out.extend(body[1:])
    return out


def _literal_blocks(lines: list[str]) -> list[str]:
    """``text::`` before an indented block to ``text:``; a lone ``::`` goes."""
    out = []
    in_fence = False
    for line in lines:
        if _FENCE.match(line):
            in_fence = not in_fence
        stripped = line.rstrip()
        if not in_fence and stripped.endswith("::") and not stripped.lstrip().startswith(".."):
            line = stripped[:-2].rstrip() if stripped.strip() == "::" else stripped[:-1]
        out.append(line)
    return out


def _unshadowed(identifier: str, obj: griffe.Object) -> str:
    """``curvext.extend`` (a submodule to static analysis) to the function it exports.

    ``from curvext.extend import extend`` in ``curvext/__init__.py`` makes
    ``curvext.extend`` the function at run time, while Griffe keeps the
    submodule; the API reference documents the function as
    ``curvext.extend.extend`` (likewise ``curvext.functional.hvp``).
    """
    try:
        target = obj.modules_collection[identifier]
    except (KeyError, AttributeError, ValueError):
        return identifier
    parent = target.parent
    if (
        target.is_module
        and parent is not None
        and target.name in (parent.exports or ())
        and target.name in target.members
    ):
        return f"{identifier}.{target.name}"
    return identifier


class RstDocstrings(griffe.Extension):
    """Rewrite every docstring of the package once it is loaded (see the module docstring)."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        self._walk(pkg)

    def _walk(self, obj: griffe.Object) -> None:
        if obj.is_attribute and obj.docstring is None:
            self._comment_docstring(obj)
        if obj.docstring is not None:
            obj.docstring.value = self._rewrite(obj.docstring.value, obj)
        for member in list(obj.members.values()):
            if not member.is_alias:
                self._walk(member)

    @staticmethod
    def _comment_docstring(obj: griffe.Object) -> None:
        try:
            source = obj.lines_collection[obj.filepath]
        except (KeyError, TypeError, AttributeError):
            return
        comment: list[str] = []
        lineno = (obj.lineno or 1) - 2
        while lineno >= 0 and source[lineno].strip().startswith("#:"):
            comment.insert(0, source[lineno].strip()[2:].strip())
            lineno -= 1
        if comment:
            obj.docstring = griffe.Docstring(
                "\n".join(comment), lineno=lineno + 2, endlineno=obj.lineno - 1, parent=obj
            )

    def _rewrite(self, text: str, obj: griffe.Object) -> str:
        lines = text.split("\n")
        lines = _grouped_params(lines)
        lines = _doctests(lines)
        lines = _math_blocks(lines)
        lines = _literal_blocks(lines)
        text = "\n".join(lines)
        text = _MATH_ROLE.sub(lambda m: "\\(" + m.group(1) + "\\)", text)
        return _ROLE.sub(lambda m: self._crossref(m.group(1), m.group(2), obj), text)

    @staticmethod
    def _crossref(role: str, target: str, obj: griffe.Object) -> str:
        title = None
        explicit = re.match(r"^(.*?)\s*<([^>]+)>$", target)
        if explicit:
            title, target = explicit.group(1), explicit.group(2)
        short = target.startswith("~")
        target = target.lstrip("~").lstrip(".").removesuffix("()")
        if title is None:
            title = target.split(".")[-1] if short else target
            if role in ("func", "meth"):
                title += "()"
        head, _, rest = target.partition(".")
        identifier = target
        if not target.startswith(obj.package.name + "."):
            try:
                identifier = obj.resolve(head) + ("." + rest if rest else "")
            except (griffe.NameResolutionError, AttributeError, KeyError):
                identifier = target
        identifier = _unshadowed(identifier, obj)
        return (
            f'<autoref identifier="{html.escape(identifier)}" optional>'
            f"<code>{html.escape(title)}</code></autoref>"
        )
