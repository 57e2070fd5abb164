"""The jobcast API: Litestar handlers over a SQLite projection of the JOBS stream."""

from app._app import create_app
from app._settings import Settings, get_settings

__all__ = ["Settings", "create_app", "get_settings"]
