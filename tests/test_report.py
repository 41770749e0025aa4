"""The PR plot's panels (detector/evaluation/report.py): no class is drawn in two panels."""

from detector.evaluation.report import pr_panels


def test_pr_panels_never_repeat_a_class():
    # one class (a one-class dataset such as a single-class VOC set): one panel, once
    assert pr_panels([7], 8) == [("all 1 class", [7])]
    assert pr_panels([3, 1, 2], 8) == [("all 3 classes", [3, 1, 2])]
    # 10 classes by rising AP: the 8 worst, then the best of the remaining two, best first
    assert pr_panels(list(range(10)), 8) == [("8 worst classes", list(range(8))), ("2 best classes", [9, 8])]
    # 200 classes: 8 and 8, disjoint
    (_, worst), (_, best) = pr_panels(list(range(200)), 8)
    assert worst == list(range(8)) and best == list(range(199, 191, -1))
