"""One module per ``histodistill`` subcommand; see ``histodistill.cli`` for the contract."""
