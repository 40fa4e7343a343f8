"""`python -m transferlab.audit`: hands over to transferlab.cli.audit (the command lives there)."""

from transferlab.cli.audit import main

if __name__ == "__main__":
    main()
