"""`python -m advlab.experiments.classification`: see `cli.main`."""

from advlab.experiments.classification.cli import main

raise SystemExit(main())
