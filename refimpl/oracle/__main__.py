"""refimpl-oracle: replay another implementation's trace in refimpl, or compare two traces.

    refimpl-oracle replay TRACE [--ranks P] [--device cpu|gpu] [--out DIR] [--rtol R] [--atol A]
    refimpl-oracle compare REF OTHER [--rtol R] [--atol A]
    mpirun -n P refimpl-oracle replay TRACE          (the same as --ranks P)

``replay`` runs the steps of TRACE (written by your implementation, e.g.
through ``refimpl.oracle.torch_writer``) in refimpl, in float64, and compares
every tensor TRACE holds with refimpl's (refimpl is the reference). With
``--ranks P`` it launches ``mpirun -np P`` itself (the same as starting it
under mpirun); the default, one process, reproduces any P (docs/oracle.md,
World size). ``--device gpu`` replays on CuPy (a GPU per rank). ``--out DIR``
keeps refimpl's trace.

``compare`` checks OTHER against REF. Both print one line per tensor (max
|diff|, relative error = max |diff| / max |ref|, where), the first divergence
in forward-then-backward order and hints (e.g. a gradient that is P times
the reference's). Exit status: 0 all tensors agree, 1 a mismatch, 2 an
unreadable or inconsistent trace.
"""
import argparse
import sys
from pathlib import Path

from refimpl.deps import add_version_argument, require

EXIT_OK, EXIT_MISMATCH, EXIT_ERROR = 0, 1, 2


def build_parser():
    p = argparse.ArgumentParser(
        prog="refimpl-oracle",
        description="Check an implementation of parametric instance classification against "
                    "refimpl: replay its trace, or compare two traces (docs/oracle.md).")
    sub = p.add_subparsers(dest="command", required=True)

    def tolerances(q):
        q.add_argument("--rtol", type=float, default=None,
                       help="relative tolerance per tensor (default: 1e-10 for float64 "
                            "traces, 1e-4 for float32)")
        q.add_argument("--atol", type=float, default=None,
                       help="absolute tolerance per tensor (default: 1e-12 / 1e-6)")
        q.add_argument("--steps", type=int, default=None, help="only the first N steps")
        q.add_argument("-q", "--mismatches-only", action="store_true",
                       help="print only the tensors that differ (and a line per step)")

    r = sub.add_parser("replay", help="run a trace's steps in refimpl (float64) and compare")
    r.add_argument("trace", help="the trace directory your implementation wrote")
    r.add_argument("--ranks", type=int, default=None,
                   help="run refimpl on P ranks (launches mpirun -np P); default 1")
    r.add_argument("--device", choices=("cpu", "gpu"), default="cpu",
                   help="replay with NumPy on the CPU (default) or CuPy on a GPU (each rank "
                        "the GPU of its node-local rank)")
    r.add_argument("--out", default=None, help="keep refimpl's trace in this directory")
    r.add_argument("--free-run", action="store_true",
                   help="carry refimpl's own state from step to step (default: start each "
                        "step from the state the trace recorded after the one before)")
    r.add_argument("--no-compare", action="store_true",
                   help="only write refimpl's trace (--out); used under mpirun")
    tolerances(r)
    c = sub.add_parser("compare", help="compare trace OTHER against the reference REF")
    c.add_argument("ref", help="the reference trace")
    c.add_argument("other", help="the trace to check")
    tolerances(c)
    add_version_argument(p, mpi=True)
    return p


def report(result, args):
    from refimpl.oracle.compare import format_trace_report
    print(format_trace_report(result, mismatches_only=args.mismatches_only), flush=True)
    return EXIT_OK if result["ok"] else EXIT_MISMATCH


def replay_command(args):
    from refimpl.oracle.replay import compare_replay, replay, replay_and_compare
    from refimpl.parallel.launch import abort_on_error, launched_by_mpi, world_comm
    if args.ranks is not None and args.ranks < 1:
        raise ValueError(f"--ranks must be >= 1, got {args.ranks}")
    if args.no_compare and args.out is None:
        raise ValueError("--no-compare needs --out DIR (where refimpl's trace goes)")
    if launched_by_mpi():
        from refimpl.oracle.trace import TraceError
        comm = world_comm("refimpl-oracle")
        if args.ranks not in (None, comm.size):
            raise ValueError(f"--ranks {args.ranks} under mpirun with {comm.size} ranks")
        import shutil
        import tempfile
        # rank 0 makes the work directory (and the output's, without --out);
        # every rank learns it: a path string, once (not in the step)
        tmp = comm.comm.bcast(tempfile.mkdtemp(prefix="refimpl-replay-")
                              if comm.rank == 0 else None, root=0)
        out = args.out if args.out is not None else Path(tmp) / "refimpl"
        try:
            with abort_on_error(comm, passthrough=(TraceError,)):
                replay(args.trace, out, comm, steps=args.steps, free_run=args.free_run,
                       device=args.device)
            if args.no_compare or comm.rank != 0:
                return EXIT_OK
            return report(compare_replay(args.trace, out, tmp, args.rtol, args.atol,
                                         steps=args.steps, free_run=args.free_run,
                                         device=args.device), args)
        finally:
            if comm.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
    if args.no_compare:
        replay(args.trace, args.out, steps=args.steps, free_run=args.free_run,
               device=args.device)
        return EXIT_OK
    result = replay_and_compare(args.trace, args.ranks or 1, args.out, args.rtol, args.atol,
                                steps=args.steps, free_run=args.free_run, device=args.device)
    return report(result, args)


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.command == "replay" and (args.ranks or 1) > 1:
        require("refimpl-oracle", ["mpi4py"], f"--ranks {args.ranks} launches mpirun")
    if args.command == "replay" and args.device == "gpu":
        require("refimpl-oracle", ["cupy"], "--device gpu")
    from refimpl.oracle.trace import TraceError
    try:
        if args.command == "replay":
            return replay_command(args)
        from refimpl.oracle.compare import compare_traces
        return report(compare_traces(args.ref, args.other, args.rtol, args.atol,
                                     steps=args.steps), args)
    except (TraceError, ValueError, OSError, RuntimeError) as e:  # RuntimeError: no mpirun
        print(f"refimpl-oracle: error: {e}", file=sys.stderr, flush=True)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
