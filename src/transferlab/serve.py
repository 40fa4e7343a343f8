"""`python -m transferlab.serve`: hands over to transferlab.cli.serve (the command lives there)."""

from transferlab.cli.serve import main

if __name__ == "__main__":
    main()
