"""`python -m transferlab.export`: hands over to transferlab.cli.export (the command lives there)."""

from transferlab.cli.export import main

if __name__ == "__main__":
    main()
