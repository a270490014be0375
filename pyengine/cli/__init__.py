"""The `pyengine` command line: thin modules that parse, call the library and print through
pyengine.report. `main` dispatches; each subcommand module exposes `register(subparsers)`."""
