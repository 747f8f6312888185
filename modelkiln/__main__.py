from modelkiln.cli import main

main()
