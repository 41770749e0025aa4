"""``python tools/benchmark_map.py`` in a checkout: the same as ``gdet-benchmark`` (code: detector/apps/benchmark_map.py)."""
from detector.apps.benchmark_map import cli

if __name__ == "__main__":
    raise SystemExit(cli())
