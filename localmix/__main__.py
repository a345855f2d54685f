from localmix.cli import main

main()
