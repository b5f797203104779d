from kvmsim.cli import main

main()
