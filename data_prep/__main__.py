"""Entry point: ``python -m data_prep <command> --help``."""
from data_prep.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
