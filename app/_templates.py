"""The UI's template engine, loaded on its first page: jinja2 costs an API that serves no page
(a deployment driven by scripts) about 2 MB of RSS, measured by P6.

Litestar's public `TemplateEngineProtocol`, delegating to its own `JinjaTemplateEngine` once a
template is first asked for; the callables Litestar registers at start (`url_for`, ...) are kept
until then.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from jinja2 import Template
    from litestar.plugins.jinja import JinjaTemplateEngine


class LazyJinjaEngine:
    """Jinja2 templates from `directory`, the engine built when the first page is rendered."""

    def __init__(self, directory: Path | list[Path] | None, engine_instance: Any | None = None) -> None:
        self.directory = directory
        self._engine: JinjaTemplateEngine | None = engine_instance
        self._callables: list[tuple[str, Any]] = []

    @property
    def engine(self) -> JinjaTemplateEngine:
        """Litestar's Jinja engine, built (and given the registered callables) on first use."""
        if self._engine is None:
            from litestar.plugins.jinja import JinjaTemplateEngine

            engine = JinjaTemplateEngine(directory=self.directory)
            for key, template_callable in self._callables:
                engine.register_template_callable(key, template_callable)
            self._engine = engine
        return self._engine

    def get_template(self, template_name: str) -> Template:
        """The template of that name (TemplateNotFoundException if there is none)."""
        return self.engine.get_template(template_name)

    def render_string(self, template_string: str, context: Mapping[str, Any]) -> str:
        """A template given as a string, rendered."""
        return self.engine.render_string(template_string, context)

    def register_template_callable(self, key: str, template_callable: Any) -> None:
        """A callable templates may call (`url_for`, ...): kept until the engine is built."""
        if self._engine is not None:
            self._engine.register_template_callable(key, template_callable)
        else:
            self._callables.append((key, template_callable))
