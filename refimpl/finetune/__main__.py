"""refimpl-finetune: phase 2, the pretrained encoder fine-tuned on labels; alone or under mpirun.

    refimpl-finetune [CONFIG.toml] [key=value ...] [--resume DIR|auto] [--save-on-interrupt]
    python -m refimpl.finetune init=runs/demo train=data/digits16/train labels=0.01
    mpirun -n 2 refimpl-finetune refimpl/finetune/demo.toml

The config file holds ``finetune.config.FineTuneConfig`` fields; ``key=value``
overrides them (``labels=0.1``, ``init=scratch``, ``freeze_encoder=true``).
Every rank checks the config, the datasets' labels and the ``init``
checkpoint first; a bad one ends the job with one message listing every
problem and exit status 2. A non-finite loss ends it with status 3, a
signal with 128 + the signal's number.
"""
import argparse
import os
import sys

from refimpl.deps import add_version_argument, require
from refimpl.parallel.launch import announcing
from refimpl.train.config import ConfigError

EXIT_CONFIG, EXIT_STOPPED = 2, 3
PROG = "refimpl-finetune"
# What the program cannot do without, checked before any work (refimpl.deps):
# the plot and the progress bar of every run; TOML before Python 3.11.
NEEDS = ["tqdm", "matplotlib"]
NEEDS_TOML = ["tomli"] if sys.version_info < (3, 11) else []


def build_parser():
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Fine-tune a pretrained encoder (a refimpl-train run, a .pt/.npz "
                    "encoder, or 'scratch') with pool + FC on C labeled classes, with all "
                    "or a fraction of the labels; alone or under mpirun -n P.")
    p.add_argument("config", nargs="?", help="TOML config file, or the name of one that ships "
                                              "with refimpl (demo: refimpl/finetune/demo.toml)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. labels=0.01 init=runs/demo out=runs/ft")
    p.add_argument("--resume", metavar="DIR|auto",
                   help="continue from a fine-tuning checkpoint directory, or 'auto': the "
                        "latest in the run directory (a fresh start if there is none)")
    p.add_argument("--save-on-interrupt", action="store_true",
                   help="on SIGINT / SIGTERM / SIGUSR1, write a checkpoint before stopping")
    add_version_argument(p, mpi=True)
    return p


def require_packages(args):
    """Exit 2 with one line if a package this run needs is missing (before any work)."""
    quiet = open(os.devnull, "w") if not announcing() else None
    try:
        require(PROG, NEEDS_TOML if args.config else [], "reading TOML before Python 3.11",
                stream=quiet)
        require(PROG, NEEDS, "the plot and the progress bar of every run", stream=quiet)
    finally:
        if quiet is not None:
            quiet.close()


def main(argv=None):
    # first of all: from here on a stop signal ends the program with 128 + signal
    # and one line, whatever it is doing (refimpl.parallel.signals)
    from refimpl.parallel.signals import Interrupted, StopSignals
    signals = StopSignals(PROG).install()
    try:
        return _main(argv, signals)
    except Interrupted as e:
        if signals.comm is None or signals.comm.rank == 0:
            print(f"{PROG}: interrupted: {e}", file=sys.stderr, flush=True)
        return 128 + e.signum


def _main(argv, signals):
    args = build_parser().parse_intermixed_args(argv)  # key=value before or after the options
    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config:  # only overrides, no file
        config, overrides = None, [config] + overrides
    require_packages(args)
    from refimpl.parallel.launch import abort_on_error, world_comm
    comm = world_comm(PROG)
    signals.comm = comm
    from refimpl.checkpoint import CheckpointError
    from refimpl.finetune.config import load_config, validate
    from refimpl.parallel.signals import Interrupted
    from refimpl.train.loop import PeerFailed, TrainingStopped
    try:
        with signals.phase("reading the config"):
            cfg = load_config(config, overrides)
            validate(cfg, comm.size)
        from refimpl.finetune.loop import FineTuner
        with abort_on_error(comm, passthrough=(ConfigError, CheckpointError, TrainingStopped,
                                               Interrupted)):
            with signals.phase("setting up the run"):
                tuner = FineTuner(cfg, comm, save_on_interrupt=args.save_on_interrupt,
                                  signals=signals)
            if args.save_on_interrupt:
                signals.announce = "stopping at the end of this step after saving a checkpoint"
            resume = args.resume
            if resume == "auto":  # the run's newest checkpoint, refused by name if incomplete
                from refimpl.checkpoint import resume_point
                resume = resume_point(tuner.cfg.out)
            results = tuner.run(resume)
            if comm.rank == 0:
                print(summary(tuner, results), flush=True)
        return 0
    except ConfigError as e:
        if not isinstance(e, PeerFailed) and (comm.rank == 0 or getattr(e, "local", False)):
            print(f"{PROG}: error: {e}", file=sys.stderr, flush=True)
        return EXIT_CONFIG
    except CheckpointError as e:  # raised on every rank together
        if comm.rank == 0:
            print(f"{PROG}: error: {e}", file=sys.stderr, flush=True)
        return EXIT_CONFIG
    except TrainingStopped as e:
        if comm.rank == 0:
            print(f"{PROG}: stopped: {e}", file=sys.stderr, flush=True)
        return EXIT_STOPPED


def summary(tuner, results):
    """The closing lines: the test accuracy, and where the run directory is."""
    cfg = tuner.cfg
    how = "frozen encoder, FC trained" if cfg.freeze_encoder else "encoder + FC trained"
    lines = ["", f"summary ({how}, init {cfg.init}, {tuner.subset.size} labeled images = "
                 f"labels {cfg.labels:g}):"]
    test = results.get("test")
    if test:
        lines.append(f"  test top-1 {100 * test[1]:.1f}%  top-5 {100 * test[5]:.1f}%")
    lines.append(f"run directory: {tuner.out.resolve()} (metrics.jsonl, curves.png, "
                 f"config.toml, label_subset.json, checkpoints)")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
