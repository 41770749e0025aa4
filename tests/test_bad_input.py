"""Bad input a user can give any tool: one line on stderr and a non-zero exit, never a traceback, a wrong
result or a partial file (issue 14: "inputs accepted that should be refused", "tracebacks instead of one
line").

Every input is made here. The tools run in this process through ``run_tool`` (what their console scripts
run), except where the exit code of a whole process or a strict stdout is the point.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from detector.apps import (
    benchmark_map,
    detect,
    export_detector,
    make_ilsvrc_vocab,
    make_priors,
    precompute_proposals,
    proposal_recall,
    train_detector,
    train_multibox,
)
from detector.base import files, options
from detector.base.cli import ToolParser, run_tool
from detector.base.errors import UserError
from detector.base.jobs import AllFailed, JobReport, refuse_all_failed

ROOT = Path(__file__).resolve().parents[1]


def one_line(capsys, *words: str) -> str:
    """The one ``error:`` line on stderr, holding every word."""
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert "Traceback" not in err
    for word in words:
        assert word in err, (word, err)
    return err


def leftovers(folder: Path) -> list[str]:
    """Temporary or probe files in ``folder`` (and below)."""
    return [str(p) for p in folder.rglob("*") if ".tmp" in p.name or "probe" in p.name or p.name.endswith(".partial")]


# -- 1. numbers, methods and options are checked where they are parsed ------------------------------------

REFUSED = [
    # (tool, arguments, what the line names); none of these reads a file: the value alone is refused
    (train_detector, ["--lr", "nan"], "--lr"),
    (train_detector, ["--lr", "0"], "--lr"),
    (train_detector, ["--lr", "inf"], "--lr"),
    (train_detector, ["--workers", "-3"], "--workers"),
    (train_detector, ["--iterations", "0"], "--iterations"),
    (train_detector, ["--val-images", "0"], "--val-images"),  # 0 is never "use the default (all)"
    (train_detector, ["--fg-fraction", "1.5"], "--fg-fraction"),
    (train_detector, ["--nms-iou", "0"], "--nms-iou"),
    (train_detector, ["--score-threshold", "-0.1"], "--score-threshold"),
    (train_detector, ["--momentum", "1"], "--momentum"),
    (train_detector, ["--weight-decay", "nan"], "--weight-decay"),
    (train_detector, ["--max-proposals", "0"], "--max-proposals"),
    (train_detector, ["--steps", "100,x"], "--steps"),
    (train_detector, ["--seed", "-1"], "--seed"),
    (train_detector, ["--proposal-method", "ss-fastest"], "--proposal-method"),
    (train_detector, ["--proposal-options", "[500]"], "--proposal-options"),
    (train_detector, ["--proposal-options", '{"max_side": 0}'], "max_side"),
    (train_detector, ["--proposal-options", '{"sede": 3}'], "sede"),
    (train_detector, ["--precision", "half"], "--precision"),
    (train_detector, ["--amp", "half"], "--amp"),
    (detect, ["a.jpg", "--precision", "none"], "--precision"),
    (train_multibox, ["--lr", "-0.01"], "--lr"),
    (train_multibox, ["--batch-size", "0"], "--batch-size"),
    (train_multibox, ["--top-k", "0"], "--top-k"),
    (train_multibox, ["--nms-iou", "1.5"], "--nms-iou"),
    (train_multibox, ["--workers", "-1"], "--workers"),
    (benchmark_map, ["--max-proposals", "0"], "--max-proposals"),  # was: the checkpoint's value, silently
    (benchmark_map, ["--iou", "0"], "--iou"),
    (benchmark_map, ["--iou", "nan"], "--iou"),
    (benchmark_map, ["--threshold", "2"], "--threshold"),
    (benchmark_map, ["--rows", "0"], "--rows"),
    (benchmark_map, ["--diagnose-top", "0"], "--diagnose-top"),
    (benchmark_map, ["--diagnose-top", "most"], "--diagnose-top"),
    (benchmark_map, ["--batch-size", "0"], "--batch-size"),
    (benchmark_map, ["--workers", "-1"], "--workers"),
    (benchmark_map, ["--chunk-size", "0"], "--chunk-size"),
    (benchmark_map, ["--shard", "2/2"], "--shard"),
    (benchmark_map, ["--shard", "half"], "--shard"),
    (benchmark_map, ["--proposals", "no-such-store"], "--proposals"),
    (precompute_proposals, ["--max-boxes", "0"], "--max-boxes"),  # was: an empty store
    (precompute_proposals, ["--max-side", "0"], "--max-side"),  # was: every image failed, "complete"
    (precompute_proposals, ["--max-side", "70000"], "--max-side"),
    (precompute_proposals, ["--min-size", "-1"], "--min-size"),
    (precompute_proposals, ["--superpixel-scale", "0"], "--superpixel-scale"),
    (precompute_proposals, ["--workers", "0"], "--workers"),
    (precompute_proposals, ["--chunk-size", "0"], "--chunk-size"),
    (precompute_proposals, ["--shard", "1/1"], "--shard"),
    (precompute_proposals, ["--method", "ss-fast:bogus"], "bogus"),  # was: ValueError
    (precompute_proposals, ["--method", "multibox:opencv"], "--method"),
    (precompute_proposals, ["--option", "seed=abc"], "seed"),  # was: every image failed, "complete"
    (precompute_proposals, ["--option", "sede=3"], "sede"),
    (precompute_proposals, ["--option", "seed"], "--option"),
    (precompute_proposals, ["--option", "max_boxes=NaN"], "--option"),
    (precompute_proposals, ["--method", "multibox", "--option", "model=no/such/model"], "model"),
    (precompute_proposals, ["--method", "googlenet", "--option", "duplicate_iou=2"], "duplicate_iou"),
    (proposal_recall, ["--max-images", "-1"], "--max-images"),  # was: all images but the last
    (proposal_recall, ["--max-images", "0"], "--max-images"),
    (proposal_recall, ["--method", "ss-fast:bogus"], "bogus"),  # was: ValueError
    (proposal_recall, ["--method", "ss-fast", "--max-side", "0"], "--max-side"),
    (make_priors, ["--k", "0"], "--k"),
    (make_priors, ["--max-iter", "0"], "--max-iter"),
    (detect, ["--threshold", "nan"], "--threshold"),
    (detect, ["--max-proposals", "0"], "--max-proposals"),
    (export_detector, ["--note", "no-value"], "--note"),
]
BASE_ARGS = {  # what each tool needs besides the bad value to get as far as checking it
    train_detector: ["--train", "{tmp}/train.json", "--out", "{tmp}/run"],
    train_multibox: ["--annotations", "{tmp}/train.json", "--out", "{tmp}/run"],
    benchmark_map: ["--model", "{tmp}/model", "--dataset", "coco", "--annotations", "{tmp}/gt.json", "--out",
                    "{tmp}/run"],
    precompute_proposals: ["{tmp}/images", "--out", "{tmp}/run"],
    proposal_recall: ["--coco", "{tmp}/gt.json", "--json", "{tmp}/run/recall.json"],
    make_priors: ["--annotations", "{tmp}/gt.json", "--out", "{tmp}/run/priors.json"],
    detect: ["{tmp}/a.png", "--json", "{tmp}/run/out.jsonl"],
    export_detector: ["{tmp}/model", "{tmp}/run/exported"],
}


@pytest.mark.parametrize("tool, flags, named", REFUSED,
                         ids=[f"{t.__name__.rpartition('.')[2]} {' '.join(f)}" for t, f, _ in REFUSED])
def test_bad_values_are_one_line_before_any_work(tool, flags, named, tmp_path, capsys):
    argv = [a.format(tmp=tmp_path) for a in BASE_ARGS[tool]] + flags
    assert run_tool(tool.main, argv) == 2
    one_line(capsys, named)
    assert not (tmp_path / "run").exists()  # nothing was made, not even the output folder


def test_the_same_examples_from_the_command_line(tmp_path):
    # the console scripts' path: exit code 2 and one line, with the option named (issue 14's examples)
    for script, flags in (("train_detector.py", ["--train", "x", "--out", str(tmp_path / "r"), "--lr", "nan"]),
                          ("precompute_proposals.py", ["x", "--out", str(tmp_path / "s"), "--max-boxes", "0"])):
        result = subprocess.run([sys.executable, str(ROOT / "tools" / script), *flags], capture_output=True,
                                text=True, timeout=120, cwd=ROOT)
        assert result.returncode == 2, result.stderr
        assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: argument --")
    assert list(tmp_path.iterdir()) == []


def test_option_types_accept_good_values_and_refuse_the_rest():
    good = [(options.positive_int, "3", 3), (options.non_negative_int, "0", 0), (options.probability, "1", 1.0),
            (options.iou, "1", 1.0), (options.unit_fraction, "0", 0.0), (options.learning_rate, "1e-3", 1e-3),
            (options.int_in(1, 65535), "65535", 65535), (options.comma_ints, "3000, 6000", (3000, 6000)),
            (options.comma_ints, "", ()), (options.diagnose_top, "all", None), (options.diagnose_top, "0.5", 0.5),
            (options.shard, "1/4", "1/4"), (options.json_object, '{"a": 1}', {"a": 1}),
            (options.key_value, "seed=3", ("seed", 3)), (options.key_value, "model=a/b", ("model", "a/b")),
            (options.proposal_method_backend, "ss-quality:opencv", "ss-quality:opencv")]
    for parse, text, value in good:
        assert parse(text) == value
    bad = [(options.positive_int, "0"), (options.positive_int, "1.5"), (options.positive_int, "x"),
           (options.non_negative_int, "-1"), (options.probability, "1.01"), (options.probability, "nan"),
           (options.iou, "0"), (options.iou, "-inf"), (options.unit_fraction, "1"), (options.learning_rate, "0"),
           (options.learning_rate, "inf"), (options.non_negative_number, "-1e-9"), (options.shard, "4/4"),
           (options.shard, "-1/4"), (options.shard, "1"), (options.json_object, "[1]"),
           (options.json_object, '{"a": NaN}'), (options.key_value, "=3"), (options.proposal_method, "ss"),
           (options.proposal_method_backend, "googlenet:native"), (options.method_or_store, "no/such/store")]
    for parse, text in bad:
        with pytest.raises(argparse.ArgumentTypeError):
            parse(text)


def test_proposal_options_are_checked_without_running_them(tmp_path):
    from proposals.propose import check_options

    check_options("ss-fast", {"max_side": 500, "seed": 3, "backend": "opencv", "max_boxes": None})
    check_options("googlenet", {"multibox_top_k": 0, "duplicate_iou": 1.0, "max_side": 300})
    check_options("multibox", {"top_k": 50, "max_side": 500})  # Selective Search options: accepted, unused
    (tmp_path / "det.json").write_text(json.dumps({"kind": "detector"}))
    (tmp_path / "det.safetensors").write_bytes(b"")
    for method, bad, named in [("ss-fast", {"seed": "abc"}, "seed"), ("ss-fast", {"max_side": 0}, "max_side"),
                               ("ss-fast", {"max_boxes": 0}, "max_boxes"), ("ss-fast", {"sigma": float("nan")}, "sigma"),
                               ("ss-fast", {"max_side": True}, "max_side"), ("ss-fast", {"top_k": 5}, "top_k"),
                               ("multibox", {"model": str(tmp_path / "none")}, "missing"),
                               ("multibox", {"model": str(tmp_path / "det")}, "not a MultiBox checkpoint"),
                               ("googlenet", {"ss_mode": "slow"}, "ss_mode"), ("ss-slow", {}, "ss-slow")]:
        with pytest.raises(ValueError, match=named):
            check_options(method, bad)


def test_tool_parser_errors_are_user_errors():
    parser = ToolParser(prog="tool")
    parser.add_argument("--n", type=options.positive_int)
    parser.add_argument("--need", required=True)
    with pytest.raises(UserError, match=r"argument --n: expected a whole number >= 1, got 0 \(see tool --help\)"):
        parser.parse_args(["--n", "0", "--need", "x"])
    with pytest.raises(UserError, match="required: --need"):
        parser.parse_args([])
    with pytest.raises(UserError, match="unrecognized arguments: --bogus"):
        parser.parse_args(["--need", "x", "--bogus"])


# -- 2. a run in which every image failed is not complete -----------------------------------------------

def junk_images(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "a.png").write_text("not an image")
    (folder / "b.jpg").write_bytes(b"\xff\xd8 truncated")
    return folder


def test_precompute_with_every_image_failed_exits_1_with_the_count(tmp_path, capsys):
    argv = [str(junk_images(tmp_path / "images")), "--out", str(tmp_path / "store"), "--max-side", "64",
            "--no-progress"]
    assert run_tool(precompute_proposals.main, argv) == 1
    captured = capsys.readouterr()
    assert "every image failed" in captured.out and "complete" not in captured.out
    # stderr: each image with its reason, then the one error line (which says the count)
    err = captured.err.strip().splitlines()
    assert [line.split(":")[0:2] for line in err[:-1]] == [["failed", " a.png"], ["failed", " b.jpg"]], err
    assert err[-1].startswith("error: all 2 images failed (first: a.png: ")
    # a rerun (the images are still bad) says so again; a good image among them would make it exit 0
    assert run_tool(precompute_proposals.main, argv + ["--retry-failed"]) == 1
    assert "all 2 images failed" in capsys.readouterr().err


def test_failed_images_are_reported_on_stderr(tmp_path, capsys):
    # issue 18: a list naming a missing image, --strict; the report table may go to a file (stdout), the
    # failures must still reach the terminal: every failed image and the count on stderr, exit 1
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(folder / "good.png")
    (tmp_path / "list.txt").write_text("good.png\nmissing.png\n")
    argv = [str(tmp_path / "list.txt"), "--image-root", str(folder), "--out", str(tmp_path / "store"),
            "--max-side", "48", "--no-progress", "--strict"]
    assert run_tool(precompute_proposals.main, argv) == 1
    captured = capsys.readouterr()
    assert "1 failed" in captured.out  # the report table
    assert "missing.png" not in captured.out and "Traceback" not in captured.err
    err = captured.err.strip().splitlines()
    assert len(err) == 2 and err[0].startswith("failed: missing.png: "), err
    assert err[1] == "1 image failed; rerun with --retry-failed to try them again"
    # a rerun lists the recorded failure again, on stderr
    assert run_tool(precompute_proposals.main, argv) == 1
    assert capsys.readouterr().err.startswith("failed: missing.png: ")


def test_the_failure_report_of_every_batch_job(capsys):
    JobReport(total=3, failures={"a.png": "missing", "b.png": "truncated"}).print_failures("rerun")
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == ["failed: a.png: missing", "failed: b.png: truncated",
                                         "2 images failed; rerun"]
    JobReport(total=2, failures={"a.png": "missing", "b.png": "x"}).print_failures("rerun")
    assert capsys.readouterr().err.splitlines()[-1] == "failed: b.png: x"  # all failed: the error line counts
    JobReport(total=2).print_failures("rerun")
    assert capsys.readouterr() == ("", "")


def test_the_all_failed_rule():
    refuse_all_failed({}, 0)  # nothing to do is not a failure
    refuse_all_failed({"a": "bad"}, 2)  # one of two failed: listed, not an error
    with pytest.raises(AllFailed, match=r"all 2 images failed \(first: a: bad\)") as info:
        refuse_all_failed({"a": "bad", "b": "bad too"}, 2)
    assert info.value.exit_code == 1
    assert JobReport(total=2, failures={"a": "x", "b": "y"}).all_failed
    assert not JobReport(total=2, failures={"a": "x"}).all_failed and not JobReport().all_failed


def test_dataset_detection_with_every_image_failed_exits_1(tmp_path, capsys):
    import torch

    from detector.base.checkpoint import make_checkpoint_config, save_checkpoint
    from detector.base.vocab import Vocabulary
    from detector.classifier import ClassifierConfig, RegionClassifier

    images = junk_images(tmp_path / "images")
    gt = {"images": [{"id": 1, "file_name": "a.png", "width": 64, "height": 48},
                     {"id": 2, "file_name": "b.jpg", "width": 64, "height": 48}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [4, 4, 20, 20], "area": 400,
                           "iscrowd": 0}],
          "categories": [{"id": 1, "name": "thing"}]}
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    torch.manual_seed(0)
    config = ClassifierConfig(num_classes=1, input_size=64)
    save_checkpoint(tmp_path / "model", RegionClassifier(config).state_dict(),
                    make_checkpoint_config(config, Vocabulary(ids=(1,), names=("thing",))))
    argv = ["--model", str(tmp_path / "model"), "--dataset", "coco", "--annotations", str(tmp_path / "gt.json"),
            "--images", str(images), "--out", str(tmp_path / "out"), "--workers", "0", "--quiet",
            "--precision", "fp32"]
    assert run_tool(benchmark_map.main, argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: all 2 images failed (first: a.png: ") and "Traceback" not in "".join(err)
    assert not (tmp_path / "out" / "coco_results.json").exists()  # nothing evaluated, no result file


# -- 3. output paths are checked before any work ------------------------------------------------------------

@pytest.fixture
def outputs(tmp_path) -> Path:
    """A folder holding a file (``file.txt``) and a folder (``dir``), and a COCO file for the tools to read."""
    (tmp_path / "file.txt").write_text("a file")
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "evaluation.json").mkdir()  # a folder where model mode writes a file
    (tmp_path / "dir" / "diagnose.png").mkdir()  # a folder where --diagnose writes a file
    junk_images(tmp_path / "images")  # an input folder
    return tmp_path


PREDICTIONS = ["--protocol", "voc", "--predictions", "{t}/p.txt", "--annotations", "{t}/voc"]
BAD_OUTPUTS = [
    (benchmark_map, PREDICTIONS + ["--json", "{t}/dir"], "is a folder"),  # was: IsADirectoryError at the end
    (benchmark_map, PREDICTIONS + ["--json", "{t}/file.txt/result.json"], "cannot write in"),
    (benchmark_map, PREDICTIONS + ["--plot", "{t}/file.txt"], "is a file"),
    (benchmark_map, PREDICTIONS + ["--diagnose", "{t}/dir"], "diagnose.png"),
    (benchmark_map, ["--model", "{t}/m", "--dataset", "voc", "--annotations", "{t}/voc", "--out", "{t}/dir"],
     "evaluation.json"),
    (precompute_proposals, ["{t}/images", "--out", "{t}/file.txt"], "is a file"),
    (precompute_proposals, ["{t}/images", "--out", "{t}/store", "--json", "{t}/dir"], "is a folder"),
    (proposal_recall, ["--coco", "{t}/gt.json", "--method", "ss-fast", "--json", "{t}/dir"], "is a folder"),
    (proposal_recall, ["--coco", "{t}/gt.json", "--method", "ss-fast", "--plot", "{t}/recall.txt"], ".png"),
    (train_detector, ["--train", "{t}/gt.json", "--out", "{t}/file.txt"], "is a file"),
    (train_multibox, ["--annotations", "{t}/gt.json", "--out", "{t}/file.txt"], "is a file"),
    (train_multibox, ["--annotations", "{t}/gt.json", "--out", "{t}/run", "--export", "{t}/file.txt/m"],
     "--export"),
    (make_priors, ["--annotations", "{t}/gt.json", "--out", "{t}/dir"], "is a folder"),
    (make_ilsvrc_vocab, ["{t}/meta_det.mat", "--out", "{t}/dir"], "is a folder"),
    (export_detector, ["{t}/model", "{t}/file.txt/exported"], "cannot write in"),
    (detect, ["{t}/a.png", "--json", "{t}/dir"], "is a folder"),
]


@pytest.mark.parametrize("tool, argv, message", BAD_OUTPUTS,
                         ids=[f"{t.__name__.rpartition('.')[2]} {a[-2]} {a[-1]}" for t, a, _ in BAD_OUTPUTS])
def test_bad_output_paths_are_one_line_before_any_work(tool, argv, message, outputs, capsys):
    before = sorted(str(p) for p in outputs.rglob("*"))
    assert run_tool(tool.main, [a.format(t=outputs) for a in argv]) == 2
    one_line(capsys, message)
    assert sorted(str(p) for p in outputs.rglob("*")) == before  # no .tmp, probe or folder left


def test_output_checks(tmp_path, monkeypatch):
    # a missing folder is created (as the atomic write does), and nothing else is left
    assert files.check_output_file(tmp_path / "new" / "sub" / "out.json", "--json") == tmp_path / "new/sub/out.json"
    assert files.check_output_folder(tmp_path / "plots", "--plot").is_dir()
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["new", "plots", "sub"]
    # a folder that cannot be written (made so here: the tests run as root, which chmod does not stop)
    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(files, "create_temporary", refuse)
    with pytest.raises(UserError, match=r"--json '.*out.json': cannot write in '.*new' \(Permission denied\)"):
        files.check_output_file(tmp_path / "new" / "out.json", "--json")


# -- 4. lists that are not UTF-8 text, and file names that are not UTF-8 -----------------------------------

@pytest.mark.parametrize("content, message", [
    # line 1 is empty (with a byte-order mark in the last case): every reader skips it and meets line 2
    (b"\nb\xff\xfe.png 2\n", "list.txt:2: not UTF-8 text (byte 0xff at column 2)"),
    (b"\n\x00\x01\x02\x03", "list.txt:2: binary data"),
    (b"\xef\xbb\xbf\n\x89PNG\r\n", "list.txt:2: not UTF-8 text (byte 0x89 at column 1)"),
    (b"\x89PNG\r\n\x1a\n\x00", "list.txt:1: not UTF-8 text (byte 0x89 at column 1)"),
])
def test_lists_that_are_not_text_are_one_line_naming_the_line(tmp_path, capsys, content, message):
    from detector.data.ilsvrc import read_blacklist, read_image_list
    from detector.data.voc import read_split_file
    from proposals.precompute import list_file

    bad = tmp_path / "list.txt"
    bad.write_bytes(content)
    for read in (read_image_list, read_blacklist, read_split_file, list_file):
        with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
            read(bad)
    # the tools: precompute's image list, benchmark_map's image list
    assert run_tool(precompute_proposals.main, [str(bad), "--out", str(tmp_path / "store")]) == 2
    one_line(capsys, message)
    assert run_tool(benchmark_map.main, ["--protocol", "ilsvrc", "--predictions", str(bad), "--annotations",
                                         str(tmp_path), "--image-list", str(bad), "--quiet"]) == 2
    one_line(capsys, message)


def test_a_binary_coco_file_is_one_line(tmp_path):
    from detector.data import read_coco

    (tmp_path / "gt.json").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    with pytest.raises(UserError, match="gt.json: not UTF-8 text"):
        read_coco(tmp_path / "gt.json")


def test_image_named_with_non_utf8_bytes_on_a_strict_stdout(tmp_path):
    # a folder with a good image and a bad one, both named with bytes that are not UTF-8; stdout is ASCII,
    # strict: the names are printed escaped, nothing crashes, and the store holds both names
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(
        os.fsdecode(bytes(folder) + b"/caf\xe9.png"))
    Path(os.fsdecode(bytes(folder) + b"/bad\xff.png")).write_bytes(b"not an image")
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "precompute_proposals.py"), str(folder), "--out",
                             str(tmp_path / "store"), "--max-side", "48", "--no-progress", "--json",
                             str(tmp_path / "report.json")],
                            capture_output=True, timeout=300, cwd=ROOT,
                            env={**os.environ, "PYTHONIOENCODING": "ascii:strict"})
    out, err = result.stdout.decode("ascii"), result.stderr.decode("ascii")
    assert result.returncode == 0 and "Traceback" not in err, err
    assert "failed: bad\\udcff.png: " in err and "complete" in out
    from proposals import ProposalStore

    store = ProposalStore(tmp_path / "store")
    assert list(store.names()) == ["caf\udce9.png"] and list(store.failures) == ["bad\udcff.png"]
    assert json.loads((tmp_path / "report.json").read_text())["failed"] == 1


# -- 5. an OSError the user can cause is one line naming the file -------------------------------------------

def test_os_errors_a_user_can_cause_are_one_line(tmp_path, capsys):
    def opens(path):
        return lambda argv: open(path, encoding="utf-8")

    assert run_tool(opens(tmp_path / "missing.txt")) == 2
    one_line(capsys, str(tmp_path / "missing.txt"), "No such file or directory", "ENOENT", "check the path")
    assert run_tool(opens(tmp_path)) == 2
    one_line(capsys, "Is a directory", "EISDIR")

    def full(argv):
        raise OSError(errno.ENOSPC, "No space left on device", "/data/out.json")

    assert run_tool(full) == 2
    one_line(capsys, "/data/out.json: No space left on device (ENOSPC); free some space")

    def bug(argv):  # an errno no user causes, and other exceptions: bugs keep their traceback
        raise OSError(errno.EBADF, "Bad file descriptor")

    with pytest.raises(OSError):
        run_tool(bug)
    with pytest.raises(ZeroDivisionError):
        run_tool(lambda argv: 1 / 0)


def test_disk_full_while_writing_is_one_line_and_a_rerun_works(tmp_path, capsys, monkeypatch):
    # make_priors on a small COCO file it reads; the disk fills while its output is written
    gt = {"images": [{"id": i, "file_name": f"{i}.jpg", "width": 100, "height": 80} for i in range(1, 5)],
          "annotations": [{"id": k, "image_id": 1 + k % 4, "category_id": 1, "bbox": [k, 2 * k, 10 + 3 * k, 8 + k],
                           "area": 1.0, "iscrowd": 0} for k in range(12)],
          "categories": [{"id": 1, "name": "thing"}]}
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    out = tmp_path / "new" / "priors.json"
    argv = ["--annotations", str(tmp_path / "gt.json"), "--k", "3", "--out", str(out)]

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(files.os, "fsync", no_space)
        assert run_tool(make_priors.main, argv) == 2
    one_line(capsys, f"error: {out}: No space left on device (ENOSPC); free some space")
    assert not out.exists() and leftovers(tmp_path) == []
    assert run_tool(make_priors.main, argv) == 0  # space again: the same command works
    assert json.loads(out.read_text())["k"] == 3


def test_disk_full_while_a_store_is_merged_names_the_real_file(tmp_path, monkeypatch):
    # issue 18: a merge's (or compaction's) part is named by its digest, known only once written; a full
    # disk named 'part-<digest>.pstore' literally. The message names the file that was being written.
    from proposals.part import ImageProposals, encode_boxes, write_part
    from proposals.store import merge

    meta = {"method": "ss-fast", "options": {}}
    for k in range(2):
        write_part(tmp_path / "s" / f"{k}.pstore",
                   [ImageProposals(f"img{k}.jpg", (40, 50), encode_boxes(np.array([[1.0, 2, 30, 20]]), (40, 50)))],
                   meta)

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr("proposals.part.os.fsync", no_space)
        with pytest.raises(UserError) as err:
            merge([tmp_path / "s"], tmp_path / "out")
    message = str(err.value)
    assert "<digest>" not in message and "No space left on device" in message and "free some space" in message
    assert message.startswith(f"{tmp_path / 'out'}/.part."), message  # the temporary part it was writing
    assert leftovers(tmp_path) == []


# -- options stored in a checkpoint's JSON: the command line's rules -----------------------------------------

@pytest.mark.parametrize("section, key, value, message", [
    ("proposals", "max_proposals", -5, "proposals.max_proposals: expected a whole number >= 1, got -5"),
    ("proposals", "max_proposals", 2.5, "proposals.max_proposals: expected a whole number >= 1, got 2.5"),
    ("postprocess", "nms_iou", 7, "postprocess.nms_iou: expected a finite number in (0, 1], got 7"),
    ("postprocess", "nms_iou", "0.3", "postprocess.nms_iou: expected a number in (0, 1], got \"0.3\""),
    ("postprocess", "score_threshold", float("nan"), "postprocess.score_threshold: expected a finite number"),
    ("postprocess", "max_detections", True, "postprocess.max_detections: expected a whole number >= 1, got true"),
    ("postprocess", "box_voting", 1.5, "postprocess.box_voting: expected a finite number in [0, 1], got 1.5"),
    ("proposals", "method", "ss-fastest", "proposals.method: unknown method 'ss-fastest'"),
])
def test_hand_edited_checkpoint_options_are_one_line_naming_the_file_and_key(tmp_path, capsys, section, key,
                                                                              value, message):
    # issue 18: a hand-edited checkpoint JSON is checked with the same rules as the command line
    import torch

    from detector.base.checkpoint import make_checkpoint_config, save_checkpoint
    from detector.base.vocab import Vocabulary
    from detector.classifier import ClassifierConfig, RegionClassifier

    torch.manual_seed(0)
    config = ClassifierConfig(num_classes=1, input_size=64)
    meta = make_checkpoint_config(config, Vocabulary(ids=(1,), names=("thing",)))
    meta[section][key] = value
    save_checkpoint(tmp_path / "model", RegionClassifier(config).state_dict(), meta)
    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(image)
    assert run_tool(detect.main, [str(image), "--model", str(tmp_path / "model"), "--device", "cpu"]) == 2
    line = one_line(capsys, f"checkpoint config '{tmp_path / 'model.json'}': {message}", "restore the original")
    assert "\n" not in line


def test_hand_edited_multibox_options_are_one_line(tmp_path):
    from detector.base.checkpoint import load_checkpoint_config

    source = ROOT / "proposals" / "resources" / "default_multibox.json"
    doc = json.loads(source.read_text())
    doc["nms_iou"] = 7
    (tmp_path / "mb.json").write_text(json.dumps(doc))
    with pytest.raises(UserError, match=r"mb.json': nms_iou: expected a finite number in \(0, 1\], got 7 \(the "
                                        r"rule of --nms-iou\)"):
        load_checkpoint_config(tmp_path / "mb")
    doc["nms_iou"], doc["top_k"] = 0.7, 0
    (tmp_path / "mb.json").write_text(json.dumps(doc))
    with pytest.raises(UserError, match="top_k: expected a whole number >= 1, got 0"):
        load_checkpoint_config(tmp_path / "mb")
    # the shipped checkpoints pass
    load_checkpoint_config(source)
    load_checkpoint_config(ROOT / "detector" / "resources" / "default_detector.json")


def test_json_values_are_checked_by_the_command_line_types():
    assert options.check_json_value(options.iou, 0.3) == 0.3
    assert options.check_json_value(options.positive_int, 2000) == 2000
    assert options.check_json_value(options.proposal_method_backend, "ss-fast:opencv") == "ss-fast:opencv"
    for parse, value in ((options.iou, 0), (options.positive_int, 0), (options.positive_int, "5"),
                         (options.probability, None), (options.proposal_method_backend, 3)):
        with pytest.raises(argparse.ArgumentTypeError):
            options.check_json_value(parse, value)


# -- one name for precision -----------------------------------------------------------------------------------

def test_one_precision_option_and_the_old_amp_spelling_warns_once(monkeypatch, capsys):
    # issue 18: training's --amp {auto,none,bf16,fp16} and detection's --precision {auto,fp32,bf16} are one
    # option, --precision {auto,fp32,bf16,fp16}, everywhere; --amp still works, warns once, none is fp32
    from detector.apps.train_detector import parse_args as train_args
    from detector.apps.train_multibox import parse_args as multibox_args

    monkeypatch.setattr(options, "_warned", set())
    needed = ["--train", "x.json", "--out", "run"]
    assert train_args(needed).precision == "auto" and capsys.readouterr().err == ""
    assert train_args([*needed, "--precision", "fp16"]).precision == "fp16"
    args = train_args([*needed, "--amp", "none"])  # parsed twice by the tool (the budget's probe): one warning
    assert args.precision == "fp32"
    assert capsys.readouterr().err == "warning: --amp is the old name of --precision; use --precision fp32\n"
    assert multibox_args(["--annotations", "x.json", "--out", "run", "--amp", "bf16"]).precision == "bf16"
    assert capsys.readouterr().err == ""  # once per process
    for parser_of in (train_args, multibox_args):
        with pytest.raises(UserError, match="argument --precision: invalid choice: 'none'"):
            parser_of([*needed, "--annotations", "x.json", "--precision", "none"])


@pytest.mark.parametrize("tool", ["train_detector", "train_multibox", "detect", "benchmark_map"])
def test_every_tool_offers_the_same_precision_words(tool, capsys):
    module = {"train_detector": train_detector, "train_multibox": train_multibox, "detect": detect,
              "benchmark_map": benchmark_map}[tool]
    with pytest.raises(SystemExit):
        module.main(["--help"])
    out = capsys.readouterr().out
    assert "--precision {auto,fp32,bf16,fp16}" in " ".join(out.split()), out
    assert "--amp" not in out  # the old name works, but is not offered


def test_fp16_needs_a_gpu_in_one_line(tmp_path):
    import torch

    from detector.device import resolve_precision
    from detector.training.engine import EngineConfig, train
    from detector.training.schedule import ScheduleConfig

    with pytest.raises(UserError, match="precision 'fp16' needs a GPU; use --precision bf16 or fp32 on the CPU"):
        resolve_precision("fp16", torch.device("cpu"))
    fp16 = EngineConfig(out_dir=str(tmp_path), precision="fp16", progress=False, num_workers=0,
                        schedule=ScheduleConfig(iterations=1, warmup_iters=0))
    with pytest.raises(UserError, match="precision 'fp16' needs a GPU; use --precision bf16 or fp32 on the CPU"):
        train(torch.nn.Linear(2, 1), None, None, fp16)
    config = EngineConfig(out_dir=str(tmp_path), precision="fp32")
    assert config.amp == "none"  # the word a run before the rename recorded in its resume settings
    with pytest.raises(ValueError, match="precision must be one of auto, fp32, bf16, fp16"):
        EngineConfig(out_dir=str(tmp_path), precision="none")
