"""Agreement before work: the ranks check that they bring the same things, before they compute.

Contract. Each check is collective (every rank calls it, in the same order)
and raises ``DisagreementError`` on every rank, with the same one-line
message naming the ranks that differ from rank 0 and their values, instead
of letting the job compute a silently wrong number or die in MPI with
MPI_ERR_TRUNCATE:

    check_agree(comm, what, values, show, advice)   any few integers (one Allgather)
    check_same_dataset(comm, what, dataset)         N and the sha256 of its manifest
    check_same_config(comm, config_dict)            the config, by hash; the differing
                                                    keys named when it differs
    raise_together(comm, error, peer)               an error on some ranks, raised on all

``raise_together`` is how work that may fail on one rank only (opening a
dataset missing on one node, rank 0 writing a file on a full disk) ends
every rank together instead of leaving the others waiting in their next
collective: the lowest failing rank raises its own error, marked
``error.local = True`` (it says it), the others ``peer(rank)``, marked
``quiet`` (rank 0 does not repeat it).

A dataset's identity is its size N and the sha256 of its manifest's
canonical JSON (``data.datasets.dataset_identity``): a packed dataset's
manifest holds the sha256 of its image and label files, so two copies with
equal manifests hold the same data, and nothing as large as the images is
read. The config is compared by its sha256; only when the hashes differ are
the configs themselves gathered, to name what differs.

(The collectives check the shapes and dtypes they are handed themselves:
``comm.check_same_shape``.)
"""
import hashlib
import json

import numpy as np

from refimpl.backend import to_numpy
from refimpl.data.datasets import dataset_identity


class DisagreementError(ValueError):
    """The ranks disagree on something they must share; raised on every rank, same message."""


def digest64(text):
    """The first 8 bytes of the sha256 of ``text`` (str or bytes), as an int64."""
    data = text.encode() if isinstance(text, str) else bytes(text)
    return int(np.frombuffer(hashlib.sha256(data).digest()[:8], dtype=np.int64)[0])


def gather_values(comm, values):
    """(P, k) int64 table: row q holds rank q's ``values`` (k integers), on every rank.
    (One process: its own row, no collective.)"""
    row = np.asarray(values, dtype=np.int64).reshape(1, -1)
    return row if comm.size == 1 else to_numpy(comm.all_gather(row))


def _differing(table):
    return [q for q in range(table.shape[0]) if not np.array_equal(table[q], table[0])]


def _rank_list(bad, describe):
    """'rank 0: ...; rank 3: ...' for rank 0 and up to three ranks that differ."""
    shown = [0] + bad[:3]
    text = "; ".join(f"rank {q}: {describe(q)}" for q in shown)
    return text + (f"; and {len(bad) - 3} more rank(s)" if len(bad) > 3 else "")


def check_agree(comm, what, values, show=None, advice=""):
    """Raise DisagreementError unless every rank brings the same integers ``values``.

    what: what is compared (the start of the message); show(row) -> text of one
    rank's values (default: the integers); advice: what to do (the message's
    end). Returns the (P, k) table. One Allgather of k int64 per rank.
    """
    table = gather_values(comm, values)
    bad = _differing(table)
    if bad:
        show = show or (lambda row: ", ".join(str(int(v)) for v in row))
        raise DisagreementError(f"{what}: the ranks disagree ("
                                + _rank_list(bad, lambda q: show(table[q])) + ")"
                                + (f": {advice}" if advice else ""))
    return table


def check_same_dataset(comm, what, dataset):
    """Every rank reads the same dataset: N and the manifest's sha256 (module docstring).

    what: how the message names it, e.g. "train 'data/cifar10/train'".
    """
    n, manifest_hash = dataset_identity(dataset)
    values = [n, int(np.frombuffer(bytes.fromhex(manifest_hash)[:8], dtype=np.int64)[0])]

    def show(row):
        return (f"{int(row[0])} instances, manifest sha256 "
                f"{np.array([row[1]], dtype=np.int64).tobytes().hex()}...")
    check_agree(comm, f"{what} differs between ranks", values, show,
                "every rank must read the same dataset (does a node hold another copy "
                "under this path?)")


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def check_same_config(comm, config):
    """Every rank runs the same config (a JSON-able dict): compare hashes, name what differs.

    One Allgather of one int64; only when the hashes differ are the configs
    gathered (one all_gather_v of their JSON) to name the keys that differ.
    """
    text = json.dumps(config, sort_keys=True, separators=(",", ":"))
    table = gather_values(comm, [digest64(text)])
    bad = _differing(table)
    if not bad:
        return
    data = np.frombuffer(text.encode(), dtype=np.uint8)
    sizes = to_numpy(comm.all_gather(np.array([data.size], dtype=np.int64))).tolist()
    everything = to_numpy(comm.all_gather_v(data, sizes)).tobytes()
    starts = np.concatenate([[0], np.cumsum(sizes)]).tolist()
    configs = [_flat(json.loads(everything[starts[q]:starts[q + 1]].decode()))
               for q in range(comm.size)]
    first = bad[0]
    keys = sorted(k for k in set(configs[0]) | set(configs[first])
                  if configs[0].get(k) != configs[first].get(k))
    differs = "; ".join(f"{k}: rank 0 {configs[0].get(k)!r}, rank {first} "
                        f"{configs[first].get(k)!r}" for k in keys[:4])
    more = f"; {len(keys) - 4} more keys" if len(keys) > 4 else ""
    raise DisagreementError(f"ranks {bad} run another configuration than rank 0 "
                            f"({differs}{more}): start every rank with the same config "
                            f"and overrides")


def raise_together(comm, error, peer):
    """Collective: if any rank brings an ``error`` (an exception; None: none), every rank raises.

    The lowest failing rank raises its own error, with ``local = True``; the
    others raise ``peer(that rank)``, with ``quiet = True``. One Allgather of
    one int64 per rank; returns None when no rank failed.
    """
    failed = gather_values(comm, [error is not None])[:, 0]
    if not failed.any():
        return
    first = int(np.argmax(failed))
    if comm.rank == first:
        error.local = True
        raise error
    other = peer(first)
    other.quiet = True
    raise other
