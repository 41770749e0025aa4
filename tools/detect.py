"""``python tools/detect.py`` in a checkout: the same as ``gdet-detect`` (code: detector/apps/detect.py)."""
from detector.apps.detect import cli

if __name__ == "__main__":
    raise SystemExit(cli())
