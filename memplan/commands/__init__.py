"""CLI commands, one module each; each registers itself on `memplan.cli.app`."""
