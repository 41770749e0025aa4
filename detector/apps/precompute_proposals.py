"""Precompute proposals for a folder or list of images into a proposal store.

    python tools/precompute_proposals.py IMAGES_DIR --out runs/ss.store --workers 2
    python tools/precompute_proposals.py val.txt --image-root ILSVRC2013_DET_val --out val.store
    python tools/precompute_proposals.py val.txt --out part0.store --shard 0/4     # machine 0 of 4
    torchrun --nproc-per-node 8 tools/precompute_proposals.py val.txt --out shared.store   # RANK/WORLD_SIZE
    python tools/precompute_proposals.py --merge part0.store part1.store ... --out val.store
    python tools/precompute_proposals.py --verify val.store        # check every part's checksums

The store is a folder; reruns skip finished images, so a killed run is resumed by running the same
command again (it also removes what a killed run left and sets damaged parts aside, as
``<part>.damaged``, redoing their images). Images that cannot be read are recorded with their reason and listed at the end; the
exit code is 0 unless --strict is given and some failed, or every image failed (then 1). Options and
output paths are checked before any work (a bad one is one line, exit 2). Read the store with
``proposals.ProposalStore(path)[image_name] -> (boxes, scores or None)``.
"""

from __future__ import annotations

import argparse
import json
import sys

from detector.base.cli import ToolParser, run_tool
from detector.base.defaults import PROPOSAL_METHODS as METHODS
from detector.base.errors import UserError
from detector.base.files import atomic_open, check_output_file, check_output_folder
from detector.base.jobs import Shard, refuse_all_failed
from detector.base.options import (
    int_in,
    key_value,
    non_negative_int,
    positive_int,
    positive_number,
    proposal_method_backend,
    shard,
)
from detector.base.threads import add_threads_argument, configure_threads
from proposals.store import REPAIR, ProposalStore, merge, verify


def parse_args(argv):
    p = ToolParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="a folder of images or a list file (one image name or path per line); with --merge: stores")
    p.add_argument("--out", help="the store folder to write (required except with --verify)")
    p.add_argument("--image-root", help="folder the list's names are relative to (default: the list's folder)")
    p.add_argument("--method", default="ss-fast", type=proposal_method_backend, metavar="METHOD[:BACKEND]",
                   help=f"proposal method: {', '.join(METHODS)} (default ss-fast); ss-* methods take a backend: "
                        "native, opencv, selectivesearch")
    p.add_argument("--max-side", type=int_in(1, 65535), default=None,
                   help="Selective Search working size, in [1, 65535] (default 500)")
    p.add_argument("--superpixel-scale", type=positive_number, default=None, help="multiply every k, > 0 (GoogLeNet: 2)")
    p.add_argument("--max-boxes", type=positive_int, default=None, help="keep at most N >= 1 boxes per image (default 2000)")
    p.add_argument("--min-size", type=non_negative_int, default=None,
                   help="drop boxes smaller than this, >= 0 (working pixels)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", type=key_value,
                   help="any other option of the method, repeatable (e.g. --option seed=3); checked before any work")
    p.add_argument("--workers", type=positive_int, default=1, help="processes on this machine, >= 1 (default 1)")
    add_threads_argument(p)  # the MultiBox network of methods multibox and googlenet, per worker
    p.add_argument("--shard", type=shard, help="K/N: do shard K of N (default: RANK/WORLD_SIZE from torchrun, else all)")
    p.add_argument("--chunk-size", type=positive_int, default=64, help="images per atomic write, >= 1 (default 64)")
    p.add_argument("--retry-failed", action="store_true", help="try again the images recorded as failed")
    p.add_argument("--strict", action="store_true", help="exit 1 if any image failed")
    p.add_argument("--merge", action="store_true", help="merge the INPUT stores into --out and stop")
    p.add_argument("--verify", action="store_true",
                   help="check every part of the INPUT stores (checksums of every image) and stop; exit 2 if damaged")
    p.add_argument("--json", help="write the run's report as JSON here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def method_options(args) -> tuple[str, tuple[tuple[str, object], ...]]:
    """``(method, options)`` of ``--method METHOD[:BACKEND]``, the Selective Search flags and ``--option``,
    checked by :func:`proposals.propose.check_options` (nothing is run): a bad one is one line here, not
    every image failed later."""
    from proposals.propose import check_options  # numba and OpenCV: after parsing, as in main

    method, _, backend = args.method.partition(":")
    options = {"backend": backend} if backend else {}
    for flag in ("max_side", "superpixel_scale", "max_boxes", "min_size"):
        if getattr(args, flag) is not None:
            options[flag] = getattr(args, flag)
    options.update((key.replace("-", "_"), value) for key, value in args.option)
    try:
        check_options(method, options)
    except ValueError as err:
        raise UserError(f"--option {err}") from None
    return method, tuple(sorted(options.items()))


def verify_stores(paths) -> int:
    """``--verify``: one line per store, one per damaged part; a damaged part is a one-line error."""
    damaged = {}
    for path in paths:
        report = verify(path)
        print(f"{path}: {report.parts} parts, {report.images} images checked, {len(report.damaged)} damaged"
              + (f", {len(report.unchecked)} of the first format (no checksums: layout checked only)"
                 if report.unchecked else ""))
        for part, reason in report.damaged.items():
            print(f"damaged: {part}: {reason}")
        damaged.update(report.damaged)
    if damaged:
        raise UserError(f"{len(damaged)} damaged proposal store parts (first: {next(iter(damaged))}); {REPAIR}")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    configure_threads(args.threads, processes=args.workers)  # before torch is imported
    # numba and OpenCV (Selective Search) after parsing, so that --help and bad flags answer at once
    from proposals.precompute import PrecomputeConfig, list_images, precompute

    if args.verify:
        return verify_stores(args.inputs)
    if args.out is None:
        raise UserError("--out is required: the store folder to write")
    if args.json:
        check_output_file(args.json, "--json")  # every output path before any work
    if args.merge:
        check_output_folder(args.out, "--out")
        target = merge(args.inputs, args.out)
        if target is None:
            raise UserError(f"nothing to merge in {', '.join(args.inputs)}; pass store folders or .pstore files")
        store = ProposalStore(args.out)
        print(f"merged {len(args.inputs)} stores into {target}: {len(store)} images, {len(store.failures)} failed")
        return 0
    if len(args.inputs) != 1:
        raise UserError("pass one INPUT (a folder or a list file), or --merge with several stores")
    method, options = method_options(args)
    entries = list_images(args.inputs[0], args.image_root)
    check_output_folder(args.out, "--out")
    config = PrecomputeConfig(method=method, options=options, workers=args.workers,
                              shard=Shard.parse(args.shard), chunk_size=args.chunk_size,
                              retry_failed=args.retry_failed)
    report = precompute(entries, args.out, config, progress=not args.no_progress)
    for note in report.notes:
        print(f"warning: {note}", file=sys.stderr)
    state = ("has no proposals: every image failed" if report.all_failed
             else "complete" if report.complete else "incomplete")
    print(f"{report.summary()}; store {args.out} {state}")
    report.print_failures("rerun with --retry-failed to try them again")  # on stderr, with every failed image
    if args.json:
        with atomic_open(args.json) as f:
            json.dump(report.to_dict(), f, indent=1)
    refuse_all_failed(report.failures, report.total)  # nothing usable made: exit 1 with the count
    return 1 if args.strict and report.failures else 0


def cli() -> int:
    """The console script ``gdet-precompute`` (and ``python tools/precompute_proposals.py``): one-line errors, an exit code."""
    return run_tool(main)


if __name__ == "__main__":
    sys.exit(cli())
