"""refimpl.parallel.launch: one list of launcher variables, one communicator for every program."""
import sys

import pytest

from refimpl.parallel import SelfComm
from refimpl.parallel.launch import LAUNCHER_VARIABLES, launched_by_mpi, world_comm


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
