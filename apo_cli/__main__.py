from apo_cli.main import main

main()
