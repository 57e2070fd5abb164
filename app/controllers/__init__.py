"""One controller per resource."""

from app.controllers.compileo import CompileoController
from app.controllers.health import HealthController
from app.controllers.jobs import JobController
from app.controllers.live import LiveController

__all__ = ["CompileoController", "HealthController", "JobController", "LiveController"]
