"""`python -m transferlab.predict`: hands over to transferlab.cli.predict (the command lives there)."""

from transferlab.cli.predict import main

if __name__ == "__main__":
    main()
