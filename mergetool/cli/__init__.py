"""The `mergetool` command line (Typer): one module per command group."""
