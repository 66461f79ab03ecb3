"""MkDocs hook: the docstrings' Sphinx roles (``:class:`Device```) shown as plain code.

The package's docstrings cross-reference with Sphinx roles; mkdocstrings renders the role's
name in front of the code (``:class:Device``). This drops the role, and a leading ``~`` keeps
the last dotted component only, as Sphinx shows it.
"""

from __future__ import annotations

import re

ROLE = re.compile(r":(?:attr|class|data|exc|func|meth|mod|obj):<code>(~?)([^<]*)</code>")


def _plain(match: re.Match[str]) -> str:
    short, name = match.groups()
    return f"<code>{name.rsplit('.', 1)[-1] if short else name}</code>"


def on_page_content(html: str, **_: object) -> str:
    return ROLE.sub(_plain, html)
