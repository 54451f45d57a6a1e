"""Test VILLA on real-data image–caption retrieval: a thin wrapper of `python -m advlab.experiments.retrieval`.

What it measured, with the controls that attribute a gain, is in docs/reproducing.md.

    bash scripts/setup_data.sh          # once: wheels, Tux Paint stamps
    python examples/retrieval.py        # quick default: UNITER-mini, baseline / zero δ / noise / VILLA, 2 seeds
    python examples/retrieval.py --full # 5 seeds: core arms on both backbones, ablations and 2 x 2 on UNITER-mini; resumable
"""

from advlab.experiments.retrieval import main

if __name__ == "__main__":
    raise SystemExit(main())
