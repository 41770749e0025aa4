"""``python tools/proposal_recall.py`` in a checkout: the same as ``gdet-recall`` (code: detector/apps/proposal_recall.py)."""
from detector.apps.proposal_recall import cli

if __name__ == "__main__":
    raise SystemExit(cli())
