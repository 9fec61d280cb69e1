"""One module per ``hal`` subcommand (see ``hal.cli.COMMANDS``)."""
