from factlab.cli import main

main()
