"""`python -m transferlab.eval`: hands over to transferlab.cli.eval (the command lives there)."""

from transferlab.cli.eval import main

if __name__ == "__main__":
    main()
