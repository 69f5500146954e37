"""The command line (`mindprint-ray ...`): the typer app, one module per command group, terminal views."""
