"""``python tools/make_priors.py`` in a checkout: the same as ``gdet-priors`` (code: detector/apps/make_priors.py)."""
from detector.apps.make_priors import cli

if __name__ == "__main__":
    raise SystemExit(cli())
