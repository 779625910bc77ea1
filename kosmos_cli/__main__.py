"""`python -m kosmos_cli` runs the `kosmos` command."""

from kosmos_cli.cli import main

main()
