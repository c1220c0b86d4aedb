"""``python -m rankwise`` runs the command-line interface."""

from rankwise.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main())
