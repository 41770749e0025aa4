"""COCO result files at ILSVRC scale (millions of results): read into arrays, written as a stream.

A COCO results file is a JSON list ``[{"image_id", "category_id", "bbox": [x, y, w, h], "score"}, ...]``.
Read with ``json.load`` it is a Python dict per result (about 0.6 KB each: 2.4 GB at 4M results). Here it
is read a chunk at a time (:func:`read_coco_results`): each result is decoded by ``json``'s own scanner
(so every number is exactly what ``json.load`` gives), checked, and kept as one row of
:class:`CocoResults` arrays (56 bytes a result). :func:`write_coco_result_chunks` writes such arrays as
they come, one image at a time, never a list of every result, through the project's one atomic write.

Checks (the same as the evaluator always made, :func:`result_problem`), each a :class:`UserError` naming
the source and the result's 0-based index, the first in file order: a result that is not ``{"image_id",
"category_id", "bbox": [x, y, w, h], "score"}``, a NaN or infinite number, an ``image_id`` that is not an
integer (or a string), a ``category_id`` not in the ground truth's categories, a negative width or height.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from detector.base.errors import UserError
from detector.base.files import atomic_open
from detector.data.coco import read_json_file

_WHITESPACE = re.compile(r"[ \t\n\r]*").match  # JSON's whitespace, as json.decoder skips it
CHUNK_CHARS = 16 << 20  # read ~16 MB of text at a time (~200k results)
OTHER_IMAGE = np.iinfo(np.int64).min  # the image id of a result whose image_id is a string: on no COCO image
_NUMBER = (int, float)
_KEYS = "{'image_id', 'category_id', 'bbox': [x, y, w, h], 'score'}"


@dataclass(frozen=True)
class CocoResults:
    """COCO results as arrays, in file order.

    image_ids: int64 ``(P,)``, COCO image ids (:data:`OTHER_IMAGE` for a string id, on no image).
    category_ids: int64 ``(P,)``, COCO category ids.
    boxes: float64 ``(P, 4)``, COCO ``[x, y, w, h]``, pixels.
    scores: float64 ``(P,)``.
    """

    image_ids: np.ndarray
    category_ids: np.ndarray
    boxes: np.ndarray
    scores: np.ndarray

    def __len__(self) -> int:
        return len(self.scores)

    def select(self, keep: np.ndarray) -> CocoResults:
        """The results at ``keep`` (a boolean mask or indices), in that order."""
        return CocoResults(self.image_ids[keep], self.category_ids[keep], self.boxes[keep], self.scores[keep])

    @staticmethod
    def empty() -> CocoResults:
        return CocoResults(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 4)), np.zeros(0))

    @staticmethod
    def concatenate(parts: list[CocoResults]) -> CocoResults:
        if not parts:
            return CocoResults.empty()
        if len(parts) == 1:
            return parts[0]
        return CocoResults(*(np.concatenate([getattr(p, k) for p in parts])
                             for k in ("image_ids", "category_ids", "boxes", "scores")))


def _is_number(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def result_problem(r, category_ids) -> str | None:
    """What is wrong with one COCO result (a decoded JSON object), or None."""
    if not (isinstance(r, dict) and {"image_id", "category_id", "bbox", "score"} <= r.keys()):
        return f"is not {_KEYS}"
    bbox, cid, image_id = r["bbox"], r["category_id"], r["image_id"]
    if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4 and all(_is_number(v) for v in bbox)
            and _is_number(r["score"])):
        return "needs 'bbox': [x, y, w, h] and 'score' as numbers"
    if not all(np.isfinite(v) for v in [*bbox, r["score"]]):
        return "has a NaN or infinite number"
    if not isinstance(image_id, (int, str, np.integer)) or isinstance(image_id, bool):
        return f"image_id {image_id!r} is not an integer"
    if not isinstance(cid, (int, np.integer)) or isinstance(cid, bool) or cid not in category_ids:
        return f"category_id {cid!r} is not a category of the ground truth ({len(category_ids)} categories)"
    if bbox[2] < 0 or bbox[3] < 0:
        return f"negative width or height {bbox[2]!r} x {bbox[3]!r}"
    return None


def check_coco_results(results: CocoResults, source: str, category_ids, start: int = 0) -> tuple[int, int | None]:
    """The value checks of :func:`result_problem` over arrays: the first bad result is a :class:`UserError`
    naming ``source`` and its index (``start`` + its row). Returns ``(number of results with a zero width or
    height, the index of the first or None)``: pycocotools scores those as false positives."""
    category_ids = {int(c) for c in category_ids}
    finite = np.isfinite(results.boxes).all(axis=1) & np.isfinite(results.scores)
    known = np.isin(results.category_ids, np.asarray(sorted(category_ids), dtype=np.int64))
    negative = (results.boxes[:, 2] < 0) | (results.boxes[:, 3] < 0)
    bad = np.flatnonzero(~finite | ~known | negative)
    if bad.size:
        i = int(bad[0])
        r = {"image_id": int(results.image_ids[i]), "category_id": int(results.category_ids[i]),
             "bbox": results.boxes[i].tolist(), "score": float(results.scores[i])}
        raise UserError(f"{source}: result {start + i} {result_problem(r, category_ids)}; fix or remove it")
    empty = np.flatnonzero((results.boxes[:, 2] == 0) | (results.boxes[:, 3] == 0))
    return int(empty.size), (start + int(empty[0]) if empty.size else None)


class _Collector:
    """Decoded results -> :class:`CocoResults`, checked; a chunk of rows in Python lists at a time."""

    def __init__(self, source: str, category_ids):
        self.source = source
        self.category_ids = {int(c) for c in category_ids}
        self.parts: list[CocoResults] = []
        self.count = 0  # results taken so far (the index of the next one)
        self.num_empty, self.first_empty = 0, None

    def add(self, objects: list) -> None:
        """Append a chunk of decoded results; the first problem (in order) is a :class:`UserError`."""
        image_ids, category_ids, boxes, scores = [], [], [], []
        bad = None
        for n, r in enumerate(objects):
            # the common case, checked cheaply; anything else goes through result_problem
            try:
                bbox, cid, image_id, score = r["bbox"], r["category_id"], r["image_id"], r["score"]
                plain = (type(bbox) is list and len(bbox) == 4 and type(score) in _NUMBER and type(cid) is int
                         and type(image_id) is int and type(bbox[0]) in _NUMBER and type(bbox[1]) in _NUMBER
                         and type(bbox[2]) in _NUMBER and type(bbox[3]) in _NUMBER)
            except (TypeError, KeyError, IndexError):
                plain = False
            if not plain:
                problem = result_problem(r, self.category_ids)
                if problem is not None:
                    bad = (n, problem)
                    break
                bbox, cid, image_id, score = ([float(v) for v in r["bbox"]], int(r["category_id"]), r["image_id"],
                                              float(r["score"]))
                image_id = OTHER_IMAGE if isinstance(image_id, str) else int(image_id)
            image_ids.append(image_id)
            category_ids.append(cid)
            boxes.append(bbox)
            scores.append(score)
        part = CocoResults(np.asarray(image_ids, dtype=np.int64), np.asarray(category_ids, dtype=np.int64),
                           np.asarray(boxes, dtype=np.float64).reshape(-1, 4), np.asarray(scores, dtype=np.float64))
        self._check(part)
        if bad is not None:
            raise UserError(f"{self.source}: result {self.count + bad[0]} {bad[1]}; fix or remove it")
        self.parts.append(part)
        self.count += len(part)

    def _check(self, part: CocoResults) -> None:
        num_empty, first_empty = check_coco_results(part, self.source, self.category_ids, start=self.count)
        self.num_empty += num_empty
        if self.first_empty is None:
            self.first_empty = first_empty

    def results(self) -> CocoResults:
        return CocoResults.concatenate(self.parts)


@dataclass(frozen=True)
class ReadResults:
    """What :func:`read_coco_results` read: the results and how many have an empty box (with the first)."""

    results: CocoResults
    num_empty_boxes: int = 0
    first_empty: int | None = None


def read_coco_results(source: str | os.PathLike | list, category_ids: Iterable[int],
                      chunk_chars: int = CHUNK_CHARS) -> ReadResults:
    """COCO results (a results JSON path, or a list of result dicts) as checked arrays.

    category_ids: the ground truth's category ids (a result naming another is refused).
    A malformed file or result is a :class:`UserError` (see the module's docstring); the file is read
    ``chunk_chars`` characters at a time, so memory is the arrays plus one chunk's decoded results.
    """
    if isinstance(source, list):
        collector = _Collector("COCO results", category_ids)
        for start in range(0, len(source), 100_000):
            collector.add(source[start:start + 100_000])
    else:
        path = Path(source)
        collector = _Collector(str(path), category_ids)
        for objects in _json_list_chunks(path, chunk_chars):
            collector.add(objects)
    return ReadResults(collector.results(), collector.num_empty, collector.first_empty)


class _Text:
    """A text file read ``chunk_chars`` at a time: ``buf`` holds the unread rest of the last chunks."""

    def __init__(self, f, path: Path, chunk_chars: int):
        self.f, self.path, self.chunk_chars = f, path, chunk_chars
        self.buf, self.lines_before, self.eof = "", 0, False

    def refill(self, pos: int) -> int:
        """Drop ``buf[:pos]``, append the next chunk; returns the new position of ``pos`` (0)."""
        self.lines_before += self.buf.count("\n", 0, pos)
        more = self.f.read(self.chunk_chars)
        self.eof = not more
        self.buf = self.buf[pos:] + more
        return 0

    def skip(self, pos: int) -> int:
        """The position of the next character that is not whitespace (``len(buf)`` at the end)."""
        while True:
            pos = _WHITESPACE(self.buf, pos).end()
            if pos < len(self.buf) or self.eof:
                return pos
            pos = self.refill(pos)

    def error(self, msg: str, pos: int) -> UserError:
        line = self.lines_before + self.buf.count("\n", 0, pos) + 1
        return UserError(f"{self.path}: not valid JSON (line {line}: {msg})")


def _json_list_chunks(path: Path, chunk_chars: int, per_chunk: int = 100_000) -> Iterator[list]:
    """The elements of the JSON list in ``path``, decoded by ``json``'s scanner, ``per_chunk`` at a time."""
    decode = json.JSONDecoder().raw_decode
    try:
        f = open(path, encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: COCO results file not found") from None
    with f:
        text = _Text(f, path, chunk_chars)
        try:
            pos = text.skip(text.refill(0))
            if pos >= len(text.buf) or text.buf[pos] != "[":
                _not_a_list(path)
            pos, objects = text.skip(pos + 1), []
            if text.buf[pos:pos + 1] == "]":
                pos += 1
            else:
                while True:  # at the start of a value
                    if not text.eof and len(text.buf) - pos < 1 << 16:  # a whole result ahead
                        pos = text.refill(pos)
                    buf = text.buf
                    try:
                        obj, pos = decode(buf, pos)
                    except json.JSONDecodeError as err:
                        if text.eof:
                            raise text.error(err.msg, err.pos) from None
                        pos = text.refill(pos)  # a result longer than what is left of the chunk
                        continue
                    objects.append(obj)
                    if len(objects) == per_chunk:
                        yield objects
                        objects = []
                    pos = _WHITESPACE(buf, pos).end()
                    if pos == len(buf):
                        pos = text.skip(pos)
                    c = text.buf[pos:pos + 1]
                    if c == "]":
                        pos += 1
                        break
                    if c != ",":
                        raise text.error("Expecting ',' delimiter", pos)
                    pos = _WHITESPACE(text.buf, pos + 1).end()
                    if pos == len(text.buf):
                        pos = text.skip(pos)
            if objects:
                yield objects
            pos = text.skip(pos)
            if pos < len(text.buf):
                raise text.error("Extra data", pos)
        except UnicodeDecodeError as err:
            raise UserError(f"{path}: not UTF-8 text (byte 0x{err.object[err.start]:02x}); the COCO results file "
                            "must be UTF-8 JSON") from None


def _not_a_list(path: Path):
    """Raise for a file that does not start with ``[``: its JSON error, or 'expected a list'."""
    read_json_file(path, "COCO results file")
    raise UserError(f"{path}: expected a COCO results list [{{'image_id', 'category_id', 'bbox', 'score'}}, ...]")


# -- writing ------------------------------------------------------------------------------------------------

def _result_lines(part: CocoResults) -> str:
    """One ``{...}`` line per result, numbers as ``json.dumps`` writes them (shortest round-trip repr)."""
    return "".join(
        f'{{"image_id": {i}, "category_id": {c}, "bbox": [{b[0]!r}, {b[1]!r}, {b[2]!r}, {b[3]!r}], '
        f'"score": {s!r}}},\n'
        for i, c, b, s in zip(part.image_ids.tolist(), part.category_ids.tolist(), part.boxes.tolist(),
                              part.scores.tolist()))


def write_coco_result_chunks(path: str | os.PathLike, parts: Iterable[CocoResults]) -> int:
    """Write COCO results given a part at a time (e.g. one image each) as one results JSON, atomically;
    returns the number of results. Each result is one line; memory is one part's text at a time."""
    count = 0
    with atomic_open(path) as f:
        f.write("[\n")
        pending = ""  # the last part's text, written once the next one shows it was not the last
        for part in parts:
            if not len(part):
                continue
            if not (np.isfinite(part.boxes).all() and np.isfinite(part.scores).all()):
                raise ValueError(f"COCO results for {path}: boxes and scores must be finite")
            if pending:
                f.write(pending)
            pending = _result_lines(part)
            count += len(part)
        f.write(pending[:-2] + "\n]\n" if pending else "]\n")
    return count
