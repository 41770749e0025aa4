"""``python tools/train_detector.py`` in a checkout: the same as ``gdet-train`` (code: detector/apps/train_detector.py)."""
from detector.apps.train_detector import cli

if __name__ == "__main__":
    raise SystemExit(cli())
