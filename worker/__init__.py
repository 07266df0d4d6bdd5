"""Hookline's delivery worker: consume, sign, POST, retry, dead-letter."""

from worker.service import Worker
from worker.settings import Settings, load_settings

__all__ = ["Settings", "Worker", "load_settings"]
