"""`python -m transferlab.explain`: hands over to transferlab.cli.explain (the command lives there)."""

from transferlab.cli.explain import main

if __name__ == "__main__":
    main()
