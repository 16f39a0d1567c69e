"""`python -m instruct_cli`: the same command line as the `instruct` console script (what `accelerate launch
-m instruct_cli ...` runs)."""

from instruct_cli.cli import main

main()
