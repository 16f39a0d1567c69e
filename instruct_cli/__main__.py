from instruct_cli.cli import main

main()
