"""``python tools/train_multibox.py`` in a checkout: the same as ``gdet-train-multibox`` (code: detector/apps/train_multibox.py)."""
from detector.apps.train_multibox import cli

if __name__ == "__main__":
    raise SystemExit(cli())
