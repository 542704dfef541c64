"""Merging candidate regions from several sources (pure logic)."""

import numpy as np

from gateway.proposals import Proposal, Source, clip_box, merge_proposals, overlap_of_smaller


def box(x0, y0, x1, y1):
    return np.array([x0, y0, x1, y1], np.float32)


def test_one_region_boxed_by_several_sources_is_one_candidate_from_the_best_source():
    merged = merge_proposals(
        [
            Proposal(box(0, 0, 100, 100), Source.SEGMENT, 0.9),
            Proposal(box(2, 1, 101, 99), Source.SALIENT, 0.5),
            Proposal(box(1, 0, 100, 100), Source.OBJECTNESS, 0.1),
            Proposal(box(300, 300, 400, 400), Source.SEGMENT, 0.2),
        ],
        0.7,
        10,
    )
    assert [p.source for p in merged] == [Source.OBJECTNESS, Source.SEGMENT]
    assert merged[1].box[0] == 300


def test_detector_classes_on_one_box_are_all_kept_for_the_exclusive_rule():
    merged = merge_proposals(
        [
            Proposal(box(0, 0, 50, 50), Source.DETECTOR, 0.6, "cup", "tableware"),
            Proposal(box(0, 0, 50, 50), Source.DETECTOR, 0.2, "bowl", "tableware"),
            Proposal(box(0, 0, 50, 50), Source.OBJECTNESS, 0.8),
        ],
        0.7,
        10,
    )
    assert [(p.source, p.class_name) for p in merged] == [(Source.DETECTOR, "cup"), (Source.DETECTOR, "bowl")]


def test_a_prolific_source_cannot_crowd_out_the_others():
    objects = [Proposal(box(i * 20, 0, i * 20 + 10, 10), Source.OBJECTNESS, 1 - i / 100) for i in range(40)]
    salient = [Proposal(box(0, 500, 300, 800), Source.SALIENT, 0.3)]
    segments = [Proposal(box(600, 500, 700, 600), Source.SEGMENT, 0.9)]
    merged = merge_proposals(objects + salient + segments, 0.7, 6)
    assert len(merged) == 6
    assert {p.source for p in merged} == {Source.OBJECTNESS, Source.SALIENT, Source.SEGMENT}
    # Within a source, the best come first.
    scores = [p.confidence for p in merged if p.source is Source.OBJECTNESS]
    assert scores == sorted(scores, reverse=True) and scores[0] == 1.0


def test_geometry_helpers():
    assert clip_box(box(-5, -5, 700, 20), 640, 480).tolist() == [0, 0, 640, 20]
    assert overlap_of_smaller(box(0, 0, 100, 100), box(10, 10, 20, 20)) == 1.0
    assert overlap_of_smaller(box(0, 0, 10, 10), box(20, 20, 30, 30)) == 0.0
