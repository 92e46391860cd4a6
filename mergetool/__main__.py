from mergetool.cli.app import main

main()
