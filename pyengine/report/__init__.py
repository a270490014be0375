"""Presentation, on top of both branches: rich tables, JSON, Chrome/Perfetto traces, Gantt PNGs,
and the run summary that sets a run's measurements beside the simulator's replay of them."""
