"""localmix.cli: the `localmix` command. It parses, calls the Python API and prints."""
