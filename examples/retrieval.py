"""Test VILLA on real-data image–caption retrieval: a thin wrapper of `python -m advlab.experiments.retrieval`.

VILLA did not help there (docs/reproducing.md).

    bash scripts/setup_data.sh          # once: wheels, Tux Paint stamps
    python examples/retrieval.py        # quick default: UNITER-mini, baseline / zero δ / noise / VILLA, 2 seeds
    python examples/retrieval.py --full # both backbones, seven arms, 5 seeds, resumable under runs/retrieval
"""

from advlab.experiments.retrieval import main

if __name__ == "__main__":
    raise SystemExit(main())
