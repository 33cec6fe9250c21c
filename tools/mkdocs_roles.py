"""mkdocs hook: render the Sphinx roles of the package's docstrings in the API reference.

The docstrings are written in Google style with Sphinx cross-reference and math roles
(``:class:`~lightning_autodp.PrivacyBudget```, ``:math:`\\sigma```). mkdocstrings renders the
Google sections but leaves the roles as text: ``:class: <code>~a.b.C</code>``. This hook turns each
role into plain code, the ``~`` form into its last name, and common TeX in math into Unicode.
"""

from __future__ import annotations

import re
from typing import Any

_ROLE = re.compile(r":(math|class|mod|attr|func|meth|obj|data|exc):\s*<code>(.*?)</code>", re.DOTALL)
_TEX = {
    r"\sigma": "σ",
    r"\gamma": "γ",
    r"\varepsilon": "ε",
    r"\epsilon": "ε",
    r"\delta": "δ",
    r"\alpha": "α",
    r"\theta": "θ",
    r"\xi": "ξ",
    r"\sum": "Σ",
    r"\sqrt": "√",
    r"\|": "‖",
    r"\le": "≤",
    r"\ge": "≥",
    r"\in": "∈",
    r"\cdot": "·",
    r"\sim": "~",
    r"\qquad": "  ",
    r"\,": " ",
}


def _tex(text: str) -> str:
    for tex, char in sorted(_TEX.items(), key=lambda kv: -len(kv[0])):
        text = text.replace(tex, char)
    return text


def _role(match: re.Match[str]) -> str:
    role, text = match.groups()
    if role == "math":
        return f"<code>{_tex(text)}</code>"
    if "&lt;" in text:  # :attr:`title <target>`: keep the title
        text = text.split("&lt;")[0].strip()
    if text.startswith("~"):
        text = text[1:].rsplit(".", 1)[-1]
    return f"<code>{text}</code>"


def on_page_content(html: str, **kwargs: Any) -> str:
    """Rewrite the roles in one page's HTML (an mkdocs event hook)."""
    return _ROLE.sub(_role, html)
