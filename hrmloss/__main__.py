"""`python -m hrmloss` and the `hrmloss` command: the command line of the run tools (hrmloss/runs/cli.py)."""
from .runs.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
