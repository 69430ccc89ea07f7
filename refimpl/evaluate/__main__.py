"""refimpl-eval: weighted kNN and a linear probe of a trained encoder, alone or under mpirun.

    refimpl-eval RUN_OR_CHECKPOINT [--train DATA] [--test DATA] [--knn-k 20 200]
                 [--temperature 0.07] [--linear-probe] [--batch-size 256]
    mpirun -n 2 refimpl-eval runs/demo --linear-probe

The network (encoder + head, BatchNorm in eval mode) comes from the
checkpoint, or the latest one of a run directory; the train and test splits
default to the run's config (``train``, ``test``). Every rank extracts the
features of its share of each split; rank 0 prints the kNN accuracy of the
pooled encoder features and of the head's output, and the linear probe.
Exit status 0; 1 with one line on a bad checkpoint or dataset; 2 with one
line on an argument out of range (--knn-k < 1 or more than the bank's
images, --temperature <= 0, --batch-size < 1); 128 + signal on Ctrl-C or
SIGTERM.
"""
import argparse
import math
import sys

from refimpl.deps import add_version_argument, require


def build_parser():
    p = argparse.ArgumentParser(
        prog="refimpl-eval",
        description="kNN (weighted, cosine) and linear-probe accuracy of a checkpoint's "
                    "encoder on a labeled train/test split.")
    p.add_argument("checkpoint", help="a checkpoint directory, or a run directory (its latest)")
    p.add_argument("--train", help="the bank / probe training split (default: the run's)")
    p.add_argument("--test", help="the evaluated split (default: the run's)")
    p.add_argument("--knn-k", type=int, nargs="+", default=None,
                   help="neighbours (default: the run's knn_k)")
    p.add_argument("--temperature", type=float, default=None, help="kNN temperature")
    p.add_argument("--linear-probe", action="store_true", help="also a linear probe")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", choices=("cpu", "gpu"), default=None)
    add_version_argument(p, mpi=True)
    return p


def bad_arguments(args):
    """The first argument out of range, as one line (None: all fine)."""
    if args.knn_k is not None and min(args.knn_k) < 1:
        return f"--knn-k must be >= 1, got {args.knn_k}"
    if args.temperature is not None and not 0 < args.temperature < math.inf:
        return f"--temperature must be > 0 and finite, got {args.temperature}"
    if args.batch_size < 1:
        return f"--batch-size must be >= 1, got {args.batch_size}"
    return None


def main(argv=None):
    from refimpl.parallel.signals import run_program
    return run_program("refimpl-eval", _evaluate, argv)  # Ctrl-C: one line, 128 + signal


def _evaluate(signals, argv):
    args = build_parser().parse_args(argv)
    problem = bad_arguments(args)
    if problem:
        print(f"refimpl-eval: error: {problem}", file=sys.stderr)
        return 2
    if args.linear_probe:
        require("refimpl-eval", ["sklearn"], "the linear probe, --linear-probe")
    from refimpl.checkpoint import CheckpointError, load_network
    from refimpl.data.datasets import open_dataset
    from refimpl.evaluate.features import extract_features
    from refimpl.evaluate.knn import weighted_knn_accuracy
    from refimpl.parallel.agreement import DisagreementError, check_same_dataset, raise_together
    from refimpl.parallel.launch import abort_on_error, world_comm
    from refimpl.parallel.signals import Interrupted
    comm = world_comm("refimpl-eval")
    signals.comm = comm
    error = None
    try:
        net, meta = load_network(args.checkpoint, args.device)
        cfg = meta["config"]
        train = open_dataset(args.train or cfg["train"])
        test = open_dataset(args.test or cfg["test"])
    except (CheckpointError, OSError, ValueError, TypeError) as e:
        error = e
    try:  # every rank stops together (a dataset missing on one node), the same data on all
        raise_together(comm, error, lambda q: ValueError(f"rank {q} could not start (its "
                                                         f"message is above)"))
        check_same_dataset(comm, f"--train {args.train or cfg['train']!r}", train)
        check_same_dataset(comm, f"--test {args.test or cfg['test']!r}", test)
    except (CheckpointError, DisagreementError, OSError, ValueError, TypeError) as e:
        if getattr(e, "local", False) or (comm.rank == 0 and not getattr(e, "quiet", False)):
            print(f"refimpl-eval: error: {e}", file=sys.stderr)
        return 1
    ks = args.knn_k or cfg["knn_k"]
    if max(ks) > len(train):
        if comm.rank == 0:
            print(f"refimpl-eval: error: --knn-k {max(ks)} is more than the bank's "
                  f"{len(train)} images (the train split)", file=sys.stderr)
        return 2
    temperature = cfg["knn_temperature"] if args.temperature is None else args.temperature
    size = cfg["image_size"] or min(train.image_size)
    with abort_on_error(comm, passthrough=(Interrupted,)):
        kw = dict(batch_size=args.batch_size, image_size=size)
        bank = extract_features(net, train, comm, **kw)
        queries = extract_features(net, test, comm, **kw)
        if comm.rank == 0:
            print(f"refimpl-eval: {cfg['arch']} width {cfg['width']} after step "
                  f"{meta['state']['step']}; bank {len(train)}, queries {len(test)}; "
                  f"BatchNorm in eval mode (the checkpoint's running statistics)")
            for kind, name in (("pooled", "encoder (pooled)"), ("head", "head output")):
                acc = weighted_knn_accuracy(bank[kind], train.labels, queries[kind],
                                            test.labels, ks=ks, temperature=temperature)
                print(f"  kNN {name:17s} " + "  ".join(f"@{k} {100 * a:.2f}%"
                                                       for k, a in acc.items()))
            if args.linear_probe:
                from refimpl.evaluate.linear_probe import linear_probe_accuracy
                acc = linear_probe_accuracy(bank["pooled"], train.labels, queries["pooled"],
                                            test.labels)
                print(f"  linear probe (frozen pooled encoder features) {100 * acc:.2f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
