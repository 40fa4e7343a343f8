"""`python -m transferlab.train`: hands over to transferlab.cli.train (the command lives there)."""

from transferlab.cli.train import main

if __name__ == "__main__":
    main()
