"""refimpl-train: train an instance classifier, alone or under ``mpirun -n P``.

    refimpl-train CONFIG.toml [key=value ...] [--resume DIR|auto] [--dry-run]
                  [--trace DIR --trace-steps N]     (an oracle trace: docs/oracle.md)
    python -m refimpl.train CONFIG.toml [key=value ...]
    mpirun -n 2 refimpl-train refimpl/train/demo.toml out=runs/demo2

The config file holds ``train.config.Config`` fields; ``key=value`` overrides
them (``alpha=0``, ``augment.crop_scale=[0.2, 1.0]``). Every rank checks the
config first; a bad one ends the job with one message listing every problem
and exit status 2. Under mpirun every rank runs this program (one rank per
process; MPI is found by mpi4py when the job was started by mpirun or srun).

--dry-run prints, without training, what the run costs on each rank: memory
of the replicated parameters, the classifier shard, the activations and the
neighbour table; bytes communicated per step by docs/design.md's formula; and
whether it fits the memory this machine has free.

--resume takes a checkpoint folder, a run folder (its latest checkpoint) or
``auto`` (the latest in out=, a fresh start if there is none); ``key=value``
overrides may come before or after the options. Ctrl-C / SIGTERM stop the
run at the end of the step inside the step loop and at once anywhere else,
with exit status 128 + signal; a second one ends it at once
(``refimpl.parallel.signals``). docs/training.md, Failure behaviour, lists
what every fault prints and exits with.
"""
import argparse
import os
import sys

from refimpl.deps import add_version_argument, require
from refimpl.parallel.launch import announcing

EXIT_CONFIG, EXIT_STOPPED = 2, 3
PROG = "refimpl-train"
# What the program cannot do without, checked before any work (refimpl.deps):
# the plot and the progress bar of every run; TOML before Python 3.11.
NEEDS = ["tqdm", "matplotlib"]
NEEDS_TOML = ["tomli"] if sys.version_info < (3, 11) else []


def build_parser():
    p = argparse.ArgumentParser(
        prog="refimpl-train",
        description="Train a ResNet as an N-way instance classifier (one class per image) "
                    "with the contrastive prior and hardest-class label smoothing; "
                    "alone or under mpirun -n P.")
    p.add_argument("config", nargs="?", help="TOML config file, or the name of one that ships "
                                              "with refimpl (demo: refimpl/train/demo.toml)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. epochs=5 alpha=0 out=runs/x")
    p.add_argument("--resume", metavar="DIR|auto",
                   help="continue from a checkpoint directory, a run directory (its latest "
                        "checkpoint), or 'auto': the latest checkpoint in out= (a fresh start "
                        "if there is none)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the memory and communication per rank, then exit")
    p.add_argument("--save-on-interrupt", action="store_true",
                   help="on SIGINT / SIGTERM / SIGUSR1, write a checkpoint before stopping "
                        "(under Open MPI's mpirun send SIGUSR1: it kills the ranks 0.25 s "
                        "after forwarding SIGINT or SIGTERM)")
    p.add_argument("--trace", metavar="DIR",
                   help="record the first training steps as an oracle trace in DIR "
                        "(docs/oracle.md; refimpl-oracle compares and replays it)")
    p.add_argument("--trace-steps", type=int, default=1, metavar="N",
                   help="how many steps --trace records (default 1)")
    add_version_argument(p, mpi=True)
    return p


def require_packages(args, cfg=None):
    """Exit 2 with one line if a package this run needs is missing (before any work)."""
    quiet = open(os.devnull, "w") if not announcing() else None
    try:
        if cfg is None:
            require(PROG, NEEDS_TOML if args.config else [], "reading TOML before Python 3.11",
                    stream=quiet)
        elif not args.dry_run:
            require(PROG, NEEDS, "the plot and the progress bar of every run", stream=quiet)
            if cfg.linear_probe:
                require(PROG, ["sklearn"], "the linear probe, linear_probe = true", stream=quiet)
    finally:
        if quiet is not None:
            quiet.close()


def main(argv=None):
    # first of all: from here on a stop signal ends the program with 128 + signal
    # and one line, whatever it is doing (refimpl.parallel.signals)
    from refimpl.parallel.signals import run_program
    return run_program("refimpl-train", _main, argv)


def _main(signals, argv):
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)  # key=value before or after the options
    if args.trace_steps < 1:
        parser.error(f"--trace-steps must be >= 1, got {args.trace_steps}")
    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config:  # only overrides, no file
        config, overrides = None, [config] + overrides
    require_packages(args)
    from refimpl.train.config import ConfigError, load_config, validate
    from refimpl.parallel.launch import abort_on_error, world_comm
    comm = world_comm("refimpl-train")
    signals.comm = comm
    from refimpl.checkpoint import CheckpointError
    from refimpl.parallel.signals import Interrupted
    from refimpl.train.loop import TrainingStopped
    try:
        with signals.phase("reading the config"):
            cfg = load_config(config, overrides)
            validate(cfg, None, comm.size)
        require_packages(args, cfg)
        if args.dry_run:
            from refimpl.train.dry_run import dry_run
            with abort_on_error(comm, passthrough=(ConfigError, Interrupted)), \
                    signals.phase("the dry run"):
                return dry_run(cfg, comm)
        from refimpl.train.loop import Trainer
        with abort_on_error(comm, passthrough=(ConfigError, CheckpointError, TrainingStopped,
                                               Interrupted)):
            with signals.phase("setting up the run"):
                trainer = Trainer(cfg, comm, save_on_interrupt=args.save_on_interrupt,
                                  signals=signals)
            if args.trace:
                from refimpl.oracle.recorder import TraceRecorder
                trainer.tracer = TraceRecorder.for_trainer(trainer, args.trace,
                                                           args.trace_steps)
            if args.save_on_interrupt:
                signals.announce = "stopping at the end of this step after saving a checkpoint"
            trainer.run(args.resume)
            if comm.rank == 0:
                print(summary(trainer), flush=True)
        return 0
    except ConfigError as e:
        from refimpl.train.loop import PeerFailed
        # a config error is the same on every rank: rank 0 says it; an error
        # found on one rank only (PeerFailed elsewhere) is said by that rank
        if not isinstance(e, PeerFailed) and (comm.rank == 0 or getattr(e, "local", False)):
            print(f"refimpl-train: error: {e}", file=sys.stderr, flush=True)
        return EXIT_CONFIG
    except CheckpointError as e:  # raised on every rank together (checkpoint.load)
        if comm.rank == 0:
            print(f"refimpl-train: error: {e}", file=sys.stderr, flush=True)
        return EXIT_CONFIG
    except TrainingStopped as e:  # every rank; said by rank 0, or by the rank it happened on
        if getattr(e, "local", False) or (comm.rank == 0 and not getattr(e, "quiet", False)):
            print(f"refimpl-train: stopped: {e}", file=sys.stderr, flush=True)
        return EXIT_STOPPED


def summary(trainer):
    """The closing lines: every kNN measured, the method's line, and where the run directory is."""
    r = trainer.results
    lines = ["", "summary (weighted kNN on the test split, k = "
             + ", ".join(map(str, trainer.cfg.knn_k)) + "):"]

    def fmt(acc):
        return "  ".join(f"@{k} {100 * a:.1f}%" for k, a in acc.items())
    if r.get("raw_pixels"):
        lines.append(f"  raw pixels                      {fmt(r['raw_pixels'])}")
    for key, name in (("random_init", "random-init encoder"), ("after_prior", "after the prior"),
                      ("trained", "trained encoder")):
        if r.get(key):
            lines.append(f"  {name:31s} {fmt(r[key]['pooled'])}   (head: {fmt(r[key]['head'])})")
    if r.get("linear_probe") is not None:
        lines.append(f"  linear probe (trained encoder)  {100 * r['linear_probe']:.1f}%")
    from refimpl.train.loop import method_line
    lines.append(method_line(trainer.cfg))  # which method these numbers are of, and why
    out = trainer.out.resolve()
    lines.append(f"run directory: {out} (metrics.jsonl, curves.png, config.toml, checkpoints)")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
