"""`python -m zcmigrate`: the same command line as the `zcmigrate` script."""

from zcmigrate.migrate.cli import main

main(prog_name="zcmigrate")
