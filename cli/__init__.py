"""jacana.cli: the command line, on top of every other package."""
