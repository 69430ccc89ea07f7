"""Smoothed targets as sparse (ids, weights) (refimpl.method.targets): against the
dense y by hand, and the checks of alpha and the neighbour table; the same
entries from the batch's rows alone, and from a trace's rows
(``oracle.replay.targets_from_rows``)."""
import numpy as np
import pytest

from refimpl.oracle import check_tensor
from refimpl.method.targets import entries_from_rows, target_entries
from refimpl.oracle.replay import targets_from_rows
from refimpl.oracle.trace import TraceError
from parallel_problem import ALPHA, B, N, dense_target, make_problem
from tolerances import ROUNDINGS64


def test_target_entries_match_dense_target():
    """target_entries' sparse (ids, weights) scatter to the hand-built dense y."""
    _, labels, _, nb = make_problem(0)
    for alpha, table in ((0.0, None), (0.0, nb), (ALPHA, nb), (0.5, nb[:, :1])):
        ids, wts = target_entries(labels, N, table, alpha)
        y = np.zeros((B, N))
        np.add.at(y, (np.arange(B)[:, None], ids), wts)
        check_tensor(f"y alpha={alpha}", y, dense_target(labels, N, table, alpha), ROUNDINGS64)
    assert ids.shape == (B, 2)  # the last case: K = 1
    assert target_entries(labels, N, nb, 0.0)[0].shape == (B, 1)  # alpha 0: one-hot
    with pytest.raises(ValueError, match="alpha = 0.2 smooths over the neighbour table"):
        target_entries(labels, N, None, ALPHA)


def test_bad_alpha_and_neighbour_tables_are_refused():
    """alpha outside [0, 1), a table of the wrong shape, ids no shard owns, a
    class among its own neighbours: ValueError naming it."""
    _, labels, _, nb = make_problem(7)
    for alpha in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"alpha must lie in \[0, 1\)"):
            target_entries(labels, N, nb, alpha)
    for table in (nb[:-1], nb[:, 0], nb[:, :0]):
        with pytest.raises(ValueError, match=rf"neighbours must have shape \({N}, K\)"):
            target_entries(labels, N, table, ALPHA)
    for value in (-1, N):  # a neighbour id that no shard owns
        table = nb.copy()
        table[labels[3], 1] = value
        with pytest.raises(ValueError, match=rf"neighbours must hold integer class ids in \[0, {N}\)"):
            target_entries(labels, N, table, ALPHA)
    table = nb.copy()
    table[labels[3], 0] = labels[3]
    with pytest.raises(ValueError, match="include the class itself"):
        target_entries(labels, N, table, ALPHA)


def test_entries_from_rows_equal_target_entries_and_are_checked_alike():
    _, labels, _, nb = make_problem(7)
    table = nb.copy()
    table[labels[3], 0] = labels[3]  # a class among its own neighbours
    # the batch's rows alone give the same entries as the table, and the same checks
    for a, b in zip(entries_from_rows(labels, N, nb[labels], ALPHA), target_entries(labels, N, nb, ALPHA)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match=rf"neighbour rows must have shape \({labels.size}, K\)"):
        entries_from_rows(labels, N, nb[labels][:-1], ALPHA)
    with pytest.raises(ValueError, match="include the class itself"):
        entries_from_rows(labels, N, table[labels], ALPHA)


def test_targets_from_rows_refuse_two_rows_for_one_id():
    """A trace's rows: an id twice with the same row is fine, with another row an error."""
    _, labels, _, nb = make_problem(7)
    twice = np.concatenate([labels[:2], labels[:1]])       # id labels[0] twice
    rows = nb[twice]
    np.testing.assert_array_equal(targets_from_rows(twice, rows, N, ALPHA)[0][:, 1:], rows)
    rows[2] = nb[labels[1]]                                  # ... with another row the second time
    with pytest.raises(TraceError, match="neighbour rows differ for one id that appears twice"):
        targets_from_rows(twice, rows, N, ALPHA)
