"""One module per `fluxjax` command: `HELP`, `add_arguments(parser)`, `run(args) -> int`."""
