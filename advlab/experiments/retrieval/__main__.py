"""`python -m advlab.experiments.retrieval`: the quick default, `--tune`, `--full` or `--report` (see `--help`)."""

from advlab.experiments.retrieval.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
