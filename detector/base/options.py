"""Command-line values checked where they are parsed: argparse ``type=`` functions for every count, size,
rate and threshold of the tools, and for the structured values (``K/N`` shards, JSON objects,
``KEY=VALUE`` pairs, proposal methods).

A bad value is refused before any work, in one line naming the option (through
:class:`detector.base.cli.ToolParser`): ``error: argument --lr: expected a finite number > 0, got 'nan'``.
Counts are whole numbers with a floor: ``0`` is never "use the default" (a tool whose option has a
meaning for 0, such as ``--workers 0`` "in the calling thread", says so and uses :func:`non_negative_int`).
Numbers are finite (``nan`` and ``inf`` are refused) and inside a stated interval, written as in the
docstrings: ``[0, 1]`` closed, ``(0, 1]`` open at 0.

Values read back from a file a tool wrote (a checkpoint's JSON) are checked by the same rules:
:func:`check_json_value` applies one of these types to a JSON value, so a hand-edited ``"nms_iou": 7`` is
refused like ``--nms-iou 7``.

No project imports but :mod:`.defaults`: every tool's parser uses these before anything heavy is loaded.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable

from detector.base.defaults import PRECISIONS, PROPOSAL_METHODS, SS_BACKENDS

__all__ = ["add_precision_argument", "check_json_value", "comma_ints", "diagnose_top", "int_in", "iou", "json_object", "json_value", "key_value", "learning_rate",
           "method_or_store", "non_negative_int", "non_negative_number", "number_in", "positive_int",
           "positive_number", "probability", "proposal_method", "proposal_method_backend", "seed", "shard",
           "unit_fraction"]


def _fail(message: str):
    raise argparse.ArgumentTypeError(message)


def _whole(text: str, want: str) -> int:
    try:
        return int(str(text).strip(), 10)
    except ValueError:
        _fail(f"expected a whole number {want}, got '{text}'")


def int_in(low: int, high: int | None = None) -> Callable[[str], int]:
    """A type: a whole number in ``[low, high]`` (``high`` None: no upper bound)."""
    want = f">= {low}" if high is None else f"in [{low}, {high}]"

    def parse(text: str) -> int:
        value = _whole(text, want)
        if value < low or (high is not None and value > high):
            _fail(f"expected a whole number {want}, got {value}")
        return value

    parse.__name__ = f"whole number {want}"
    parse.json_types = (int,)  # what check_json_value accepts from a JSON file
    return parse


positive_int = int_in(1)  # counts and sizes: images, boxes, iterations, workers where 0 means nothing
non_negative_int = int_in(0)  # counts whose 0 has a stated meaning (e.g. --workers 0: the calling thread)
seed = int_in(0)  # random seeds (numpy refuses negative ones)


def number_in(low: float | None = None, high: float | None = None, *, low_open: bool = False,
              high_open: bool = False) -> Callable[[str], float]:
    """A type: a finite number in the interval from ``low`` to ``high`` (None: unbounded on that side),
    open at an end where ``low_open`` / ``high_open``."""
    if low is None and high is None:
        raise ValueError("number_in: give low, high or both")
    left = "(" if low_open or low is None else "["
    right = ")" if high_open or high is None else "]"
    if low is not None and high is None:
        want = f"> {low:g}" if low_open else f">= {low:g}"
    elif high is not None and low is None:
        want = f"< {high:g}" if high_open else f"<= {high:g}"
    else:
        want = f"in {left}{low:g}, {high:g}{right}"

    def parse(text: str) -> float:
        try:
            value = float(str(text).strip())
        except ValueError:
            _fail(f"expected a finite number {want}, got '{text}'")
        if not math.isfinite(value):
            _fail(f"expected a finite number {want}, got '{text}'")
        if low is not None and (value < low or (low_open and value == low)):
            _fail(f"expected a finite number {want}, got {value:g}")
        if high is not None and (value > high or (high_open and value == high)):
            _fail(f"expected a finite number {want}, got {value:g}")
        return value

    parse.__name__ = f"number {want}"
    parse.json_types = (int, float)
    return parse


probability = number_in(0.0, 1.0)  # score thresholds, foreground fractions: [0, 1]
iou = number_in(0.0, 1.0, low_open=True)  # IoU thresholds: (0, 1] (0 would match everything)
unit_fraction = number_in(0.0, 1.0, high_open=True)  # dropout, momentum: [0, 1)
positive_number = number_in(0.0, low_open=True)  # scales, factors: (0, inf)
non_negative_number = number_in(0.0)  # weights, decays, clip norms where 0 means "none": [0, inf)
learning_rate = positive_number  # (0, inf): 0 trains nothing, nan poisons the weights


def comma_ints(text: str) -> tuple[int, ...]:
    """A type: comma-separated whole numbers >= 1 (``"3000,6000"``; ``""`` is none), e.g. step iterations."""
    parse = positive_int
    return tuple(parse(part) for part in str(text).split(",") if part.strip())


def diagnose_top(text: str) -> float | None:
    """A type: ``all`` (None) or a finite number > 0 (a multiple of each class's objects)."""
    if str(text).strip().lower() == "all":
        return None
    try:
        return positive_number(text)
    except argparse.ArgumentTypeError:
        _fail(f"expected a finite number > 0 or 'all', got '{text}'")


def shard(text: str) -> str:
    """A type: ``K/N`` with whole numbers ``0 <= K < N`` (returned as given; the job framework parses it)."""
    index, sep, count = str(text).partition("/")
    try:
        k, n = int(index, 10), int(count, 10)
    except ValueError:
        _fail(f"expected K/N with whole numbers, e.g. 0/4, got '{text}'")
    if not sep or not (n >= 1 and 0 <= k < n):
        _fail(f"expected K/N with 0 <= K < N, got '{text}'")
    return f"{k}/{n}"


def json_value(text: str):
    """A JSON scalar, list or object (``2``, ``0.5``, ``null``, ``true``, ``[1, 2]``), else the text as a
    string; ``NaN`` and ``Infinity`` are refused."""
    try:
        value = json.loads(text, parse_constant=lambda c: _fail(f"{c} is not a finite number"))
    except json.JSONDecodeError:
        return text
    return value


def json_object(text: str) -> dict:
    """A type: a JSON object (``'{"max_side": 500}'``)."""
    try:
        value = json.loads(text, parse_constant=lambda c: _fail(f"{c} is not a finite number"))
    except json.JSONDecodeError as err:
        _fail(f"expected a JSON object such as '{{\"max_side\": 500}}', got '{text}' ({err.msg})")
    if not isinstance(value, dict):
        _fail(f"expected a JSON object such as '{{\"max_side\": 500}}', got '{text}'")
    return value


def key_value(text: str) -> tuple[str, object]:
    """A type: ``KEY=VALUE`` as ``(KEY, value)``, the value read by :func:`json_value`."""
    key, sep, value = str(text).partition("=")
    key = key.strip()
    if not sep or not key:
        _fail(f"expected KEY=VALUE, e.g. seed=3, got '{text}'")
    return key, json_value(value)


def proposal_method(text: str) -> str:
    """A type: one of the proposal methods (:data:`detector.base.defaults.PROPOSAL_METHODS`)."""
    if text not in PROPOSAL_METHODS:
        _fail(f"unknown method '{text}'; use a proposal method: {', '.join(PROPOSAL_METHODS)}")
    return text


def proposal_method_backend(text: str) -> str:
    """A type: ``METHOD[:BACKEND]``, the backend (``native``, ``opencv``, ``selectivesearch``) for a
    Selective Search method only."""
    method, sep, backend = str(text).partition(":")
    proposal_method(method)
    if sep and not method.startswith("ss-"):
        _fail(f"'{text}': only Selective Search methods (ss-*) take a backend")
    if sep and backend not in SS_BACKENDS:
        _fail(f"'{text}': unknown backend '{backend}'; use one of {', '.join(SS_BACKENDS)}")
    return text


def method_or_store(text: str) -> str:
    """A type: a proposal method, or the path of something that exists (a precomputed store)."""
    if text in PROPOSAL_METHODS or os.path.exists(text):
        return text
    _fail(f"'{text}': no proposal store here, and not a proposal method ({', '.join(PROPOSAL_METHODS)}); give "
          "one or the other")


def check_json_value(parse: Callable[[str], object], value: object):
    """``value``, read from a JSON file, checked by the command-line type ``parse`` (one of this module's):
    the same interval and the same message (``ArgumentTypeError``). A number type takes a JSON number
    (never ``true`` or ``"0.5"``), any other type a string. Returns the parsed value."""
    want = getattr(parse, "json_types", (str,))
    if isinstance(value, bool) or not isinstance(value, want):
        shown = json.dumps(value, allow_nan=True)
        _fail(f"expected a {getattr(parse, '__name__', 'value')}, got {shown}" if want != (str,)
              else f"expected a string, got {shown}")
    if isinstance(value, float) and not math.isfinite(value):
        _fail(f"expected a finite {getattr(parse, '__name__', 'number')}, got {value}")
    return parse(value if isinstance(value, str) else repr(value))


# -- the network's precision: one option, one set of words, for every tool ----------------------------------

AMP_WORDS = {"auto": "auto", "none": "fp32", "fp32": "fp32", "bf16": "bf16", "fp16": "fp16"}  # --amp: the old name
_warned: set[str] = set()  # deprecated spellings already warned about in this process (once each)


class _DeprecatedAmp(argparse.Action):
    """``--amp WORD``: the training tools' earlier name for ``--precision`` (``none`` is ``fp32``); sets
    ``precision`` and warns once on stderr."""

    def __call__(self, parser, namespace, values, option_string=None):
        word = AMP_WORDS[values]
        if "--amp" not in _warned:
            _warned.add("--amp")
            print(f"warning: --amp is the old name of --precision; use --precision {word}", file=sys.stderr)
        setattr(namespace, self.dest, word)


def add_precision_argument(parser, help: str, default: str = "auto") -> None:
    """``--precision {auto,fp32,bf16,fp16}`` on ``parser`` (or an argument group), the one name of every
    tool (``help`` says what ``auto`` picks there), and the old ``--amp {auto,none,bf16,fp16}`` as a
    hidden alias that warns once (``none``: ``fp32``)."""
    parser.add_argument("--precision", default=default, choices=PRECISIONS, help=help)
    parser.add_argument("--amp", dest="precision", choices=tuple(AMP_WORDS), action=_DeprecatedAmp,
                        help=argparse.SUPPRESS)
