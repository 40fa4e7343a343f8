"""`python -m transferlab.attack`: hands over to transferlab.cli.attack (the command lives there)."""

from transferlab.cli.attack import main

if __name__ == "__main__":
    main()
