"""refimpl.parallel.launch: one list of launcher variables, one communicator for every program."""
import sys

import pytest

from refimpl.parallel import SelfComm
from refimpl.parallel.launch import (LAUNCHER_FAILURES, LAUNCHER_VARIABLES, launched_by_mpi,
                                     run_mpirun, world_comm)


def test_every_launchers_variable_is_recognised():
    assert not launched_by_mpi({})
    assert not launched_by_mpi({"SLURM_JOB_ID": "7"})  # inside an sbatch script, not a step
    for name in LAUNCHER_VARIABLES:
        assert launched_by_mpi({name: "2"}), name


def test_alone_the_world_is_a_size_1_communicator(monkeypatch):
    for name in LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # alone, mpi4py is never imported
    comm = world_comm("prog")
    assert isinstance(comm, SelfComm) and comm.size == 1


@pytest.mark.parametrize("program, argv", [("refimpl-train", ["epochs=1"]),
                                           ("refimpl-eval", ["runs/none"]),
                                           ("refimpl-oracle", ["replay", "no-trace"])])
def test_a_launcher_without_mpi4py_is_one_line_naming_the_program(program, argv, monkeypatch):
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # import mpi4py raises ImportError
    module = {"refimpl-train": "refimpl.train.__main__",
              "refimpl-eval": "refimpl.evaluate.__main__",
              "refimpl-oracle": "refimpl.oracle.__main__"}[program]
    main = __import__(module, fromlist=["main"]).main
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == (f"{program}: started by an MPI launcher but mpi4py is not "
                               f"installed: pip install 'refimpl[mpi]'")


def fake_mpirun(tmp_path, failures, message):
    """A stand-in for mpirun: prints ``message`` and exits 213 its first
    ``failures`` times (counted in a file), then exits 0."""
    script = tmp_path / "mpirun"
    script.write_text(f"""import pathlib, sys
count = pathlib.Path({str(tmp_path / 'count')!r})
n = int(count.read_text()) if count.exists() else 0
count.write_text(str(n + 1))
if n < {failures}:
    print({message!r}, file=sys.stderr)
    sys.exit(213)
print("ran")
""")
    return [sys.executable, str(script)], tmp_path / "count"


def test_an_mpirun_that_did_not_start_is_started_again(tmp_path):
    cmd, count = fake_mpirun(tmp_path, 2, LAUNCHER_FAILURES[0])
    proc = run_mpirun(cmd, attempts=3)
    assert proc.returncode == 0 and proc.stdout == "ran\n"
    assert count.read_text() == "3"


def test_a_run_whose_ranks_started_is_never_repeated(tmp_path):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    cmd, count = fake_mpirun(tmp_path / "a", 1, "Traceback: labels must lie in [0, 62)")
    proc = run_mpirun(cmd, attempts=3)
    assert proc.returncode == 213 and count.read_text() == "1"
    cmd, count = fake_mpirun(tmp_path / "b", 5, LAUNCHER_FAILURES[1])  # gives up after 3
    proc = run_mpirun(cmd, attempts=3)
    assert proc.returncode == 213 and count.read_text() == "3"
