"""``python tools/precompute_proposals.py`` in a checkout: the same as ``gdet-precompute`` (code: detector/apps/precompute_proposals.py)."""
from detector.apps.precompute_proposals import cli

if __name__ == "__main__":
    raise SystemExit(cli())
