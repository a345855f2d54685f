from localmix.cli.main import main

main()
