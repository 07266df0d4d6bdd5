"""Hookline's benchmark harness (`make bench`): every figure is a ratio to a baseline run
in the same session, on this machine, against loopback only."""
