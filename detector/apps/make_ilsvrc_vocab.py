"""Write the package's ILSVRC DET vocabulary file from the devkit's meta_det.mat.

    python tools/make_ilsvrc_vocab.py ../shared/data/ilsvrc2014_devkit/data/meta_det.mat
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from detector.base.cli import ToolParser, run_tool
from detector.base.files import atomic_write, check_output_file
from detector.base.vocab import read_meta_det

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "resources" / "ilsvrc_det200.tsv"


def main(argv: list[str] | None = None) -> int:
    parser = ToolParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("meta", help="the devkit's data/meta_det.mat")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output TSV (default: %(default)s)")
    args = parser.parse_args(argv)
    check_output_file(args.out, "--out")  # before any work
    vocab = read_meta_det(args.meta)
    lines = ["id\twnid\tname"] + [f"{i}\t{w}\t{n}" for i, w, n in zip(vocab.ids, vocab.wnids, vocab.names)]
    atomic_write(args.out, "\n".join(lines) + "\n")
    print(f"wrote {len(vocab)} classes to {args.out}")
    return 0


def cli() -> int:
    """The console script ``gdet-make-vocab`` (and ``python tools/make_ilsvrc_vocab.py``): one-line errors, an exit code."""
    return run_tool(main)


if __name__ == "__main__":
    sys.exit(cli())
