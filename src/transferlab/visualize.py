"""`python -m transferlab.visualize`: hands over to transferlab.cli.visualize (the command lives there)."""

from transferlab.cli.visualize import main

if __name__ == "__main__":
    main()
