"""`python -m acf.cli ...`: the same as the `acf` command."""

from acf.cli.main import main

main()
