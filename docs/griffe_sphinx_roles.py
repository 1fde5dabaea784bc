"""A Griffe extension for the API reference: Sphinx roles in docstrings become Markdown.

The package's docstrings use Sphinx roles such as ``:class:`~cosmoflow_actors.StorageError` ``
and ``:meth:`commit` ``. mkdocstrings renders docstrings as Markdown, where those roles
would show up verbatim. This extension rewrites them when Griffe loads the package:

- a role naming a public name of ``cosmoflow_actors`` (one in ``__all__``) becomes a
  cross-reference to its entry in the reference, for example
  ``[`StorageError`][cosmoflow_actors.StorageError]``;
- any other role becomes inline code: ``:meth:`commit` `` is ```commit```, and
  ``~a.b.name`` shows as ``name``.

It is loaded by ``mkdocs.yml`` (``extensions: [docs/griffe_sphinx_roles.py]``) and is
not part of the site (``exclude_docs``).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(?:class|meth|func|attr|exc|mod|data|obj|const):`([^`]+)`")
PACKAGE = "cosmoflow_actors"


def _public_names() -> frozenset[str]:
    """The names in the package's ``__all__``, read from its source (nothing is imported)."""
    init = Path(__file__).resolve().parent.parent / PACKAGE / "__init__.py"
    for statement in ast.parse(init.read_text(encoding="utf-8")).body:
        if isinstance(statement, ast.Assign) and any(
            isinstance(target, ast.Name) and target.id == "__all__" for target in statement.targets
        ):
            return frozenset(ast.literal_eval(statement.value))
    return frozenset()


class SphinxRoles(griffe.Extension):
    """Rewrite Sphinx roles in every docstring of the package."""

    def __init__(self) -> None:
        super().__init__()
        self.public = _public_names()

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None and ":" in obj.docstring.value:
            obj.docstring.value = ROLE.sub(self._replace, obj.docstring.value)

    def _replace(self, match: re.Match[str]) -> str:
        target = match.group(1).strip()
        short = target.startswith("~")
        path = target.lstrip("~.")
        name = path.rsplit(".", 1)[-1]
        shown = name if short else path
        if path in {name, f"{PACKAGE}.{name}"} and name in self.public:
            return f"[`{shown}`][{PACKAGE}.{name}]"
        for module in ("errors", "storage", "flow", "node", "action", "events"):
            if path == f"{PACKAGE}.{module}.{name}" and name in self.public:
                return f"[`{shown}`][{PACKAGE}.{name}]"
        return f"`{shown}`"
