"""``python tools/export_detector.py`` in a checkout: the same as ``gdet-export`` (code: detector/apps/export_detector.py)."""
from detector.apps.export_detector import cli

if __name__ == "__main__":
    raise SystemExit(cli())
