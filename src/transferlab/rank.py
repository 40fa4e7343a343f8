"""`python -m transferlab.rank`: hands over to transferlab.cli.rank (the command lives there)."""

from transferlab.cli.rank import main

if __name__ == "__main__":
    main()
