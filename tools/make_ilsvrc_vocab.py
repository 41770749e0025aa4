"""``python tools/make_ilsvrc_vocab.py`` in a checkout: the same as ``gdet-make-vocab`` (code: detector/apps/make_ilsvrc_vocab.py)."""
from detector.apps.make_ilsvrc_vocab import cli

if __name__ == "__main__":
    raise SystemExit(cli())
