"""Hookline's control plane: the endpoint registry's HTTP API (``python -m api``)."""
