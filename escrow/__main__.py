from escrow.cli import main

main()
