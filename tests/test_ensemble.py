"""Ensemble utilities on hand-made score tables, computed by hand."""
import math

import pytest
import torch

from noiseopt.core import ConfigError
from noiseopt.ensemble import Ensemble, utilities

TABLE = torch.tensor([[0.50, 6.0],
                      [0.70, 5.0],
                      [0.60, 7.0],
                      [0.70, 4.0]])


def test_rank_is_mean_of_ranks_with_ties_shared():
    # column 0 ranks: 0.50 -> 1, 0.60 -> 2, the two 0.70 share (3 + 4) / 2; column 1: 4 -> 1, 5 -> 2, 6 -> 3, 7 -> 4
    assert utilities(TABLE, method="rank").tolist() == [(1 + 3) / 2, (3.5 + 2) / 2, (2 + 4) / 2, (3.5 + 1) / 2]
    assert utilities(TABLE, [3, 1], method="rank").tolist() == [(3 * 1 + 3) / 4, (3 * 3.5 + 2) / 4, (3 * 2 + 4) / 4,
                                                               (3 * 3.5 + 1) / 4]
    # the order of the pool does not matter
    perm = torch.tensor([2, 0, 3, 1])
    assert torch.equal(utilities(TABLE[perm]), utilities(TABLE)[perm])


def test_zscore_and_raw_by_hand():
    col0, col1 = [0.5, 0.7, 0.6, 0.7], [6.0, 5.0, 7.0, 4.0]

    def z(col):
        m = sum(col) / len(col)
        s = math.sqrt(sum((c - m) ** 2 for c in col) / len(col))
        return [(c - m) / s for c in col]

    expected = [(a + b) / 2 for a, b in zip(z(col0), z(col1))]
    assert torch.allclose(utilities(TABLE, method="zscore"), torch.tensor(expected, dtype=torch.float64))
    assert torch.allclose(utilities(TABLE, [2, 0.5], method="raw"),
                          torch.tensor([2 * a + 0.5 * b for a, b in zip(col0, col1)], dtype=torch.float64))


def test_constant_verifier_changes_no_ranking():
    with_const = torch.cat([TABLE[:, :1], torch.full((4, 1), 9.0)], dim=1)
    for method in ("rank", "zscore", "raw"):
        assert torch.equal(utilities(with_const, method=method).argsort(), utilities(TABLE[:, :1], method=method).argsort())


def test_nan_ranks_last():
    t = torch.tensor([[0.2, 1.0], [float("nan"), 9.0], [0.1, 2.0]])
    r = utilities(t[:, :1], method="rank")
    assert r.tolist() == [3.0, 1.0, 2.0]
    assert not torch.isnan(utilities(t, method="zscore")).any()
    assert utilities(t, method="raw")[1].item() == pytest.approx(0.1 + 9.0)  # NaN counts as the column minimum


class Counting:
    def __init__(self, name, fn):
        self.name, self.fn, self.calls = name, fn, 0

    def score(self, images, prompts):
        self.calls += 1
        return self.fn(images)


def test_ensemble_scores_each_verifier_once_and_validates():
    a = Counting("a", lambda x: x.mean((1, 2, 3)))
    b = Counting("b", lambda x: -x.mean((1, 2, 3)))
    ens = Ensemble([a, b], weights=[1.0, 0.0])
    imgs = torch.rand(5, 3, 2, 2)
    cols = ens.score(imgs, [""] * 5)
    assert a.calls == b.calls == 1 and set(cols) == {"a", "b"}
    assert torch.equal(ens.utility(cols).argsort(), cols["a"].argsort())
    per_candidate = [{"a": float(cols["a"][i]), "b": float(cols["b"][i])} for i in range(5)]
    assert torch.equal(ens.utility(per_candidate), ens.utility(cols))
    assert torch.equal(Ensemble(a).utility({"a": cols["a"]}).argsort(), cols["a"].argsort())
    with pytest.raises(ConfigError, match="unknown ensemble method"):
        Ensemble(a, method="vote")
    with pytest.raises(ConfigError, match="one weight per verifier"):
        Ensemble([a, b], weights=[1.0])
    with pytest.raises(ConfigError, match="not all zero"):
        Ensemble([a, b], weights=[0.0, 0.0])
    with pytest.raises(ConfigError, match="unique"):
        Ensemble([a, Counting("a", lambda x: x)])
