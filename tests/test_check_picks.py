"""export.cache_feed.check_picks: a graph's in-graph greedy pick against its logits. fp32 picks
must be numpy's argmax exactly; fp16 picks may break a tie differently (ONNX Runtime's CPU
provider picks on the unrounded fp32 head), but must still be a maximal logit."""

from __future__ import annotations

import numpy as np
import pytest

from export.cache_feed import check_picks
from export.checks import ContractError


def tied_logits(dtype) -> np.ndarray:
    logits = np.zeros((1, 3, 10), dtype)
    logits[0, 0, 2] = logits[0, 0, 7] = 5  # a tie: numpy takes 2
    logits[0, 1, 4] = 3
    logits[0, 2, 9] = 1
    return logits


def test_the_argmax_passes_in_both_precisions():
    for dtype in (np.float32, np.float16):
        check_picks(np.array([[2, 4, 9]]), tied_logits(dtype))


def test_an_fp16_tie_broken_the_other_way_passes():
    check_picks(np.array([[7, 4, 9]]), tied_logits(np.float16))


def test_an_fp32_tie_broken_the_other_way_is_an_exporter_bug():
    with pytest.raises(ContractError, match=r"next_token \[7, 4, 9\] is not its logits' argmax \[2, 4, 9\]"):
        check_picks(np.array([[7, 4, 9]]), tied_logits(np.float32))


def test_an_fp16_pick_below_the_maximum_is_an_exporter_bug_named_where():
    with pytest.raises(ContractError, match=r"next_token \[3, 9\] is not its logits' argmax \[4, 9\] \(from position 1"):
        check_picks(np.array([[2, 3, 9]]), tied_logits(np.float16))


def test_a_wrong_shape_is_an_exporter_bug():
    with pytest.raises(ContractError, match=r"shapes \[1, 2\] and \[1, 3\]"):
        check_picks(np.array([[2, 4]]), tied_logits(np.float16))
