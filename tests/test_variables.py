"""`${VAR}` values: one merge (`--set`, then the run script's variables from the environment, then
the defaults), obeyed by every entry point, and no arbitrary environment variable in saved files."""

from __future__ import annotations

import logging

import pytest

from rloss.errors import VariableError
from rloss.io import read_net_param
from rloss.proto.text import read_net
from rloss.solver import Solver
from rloss.variables import ENVIRONMENT_VARIABLES, variable_values
from tests.test_solver import solver_file, write_dataset


def test_only_the_run_scripts_variables_come_from_the_environment(caplog):
    environ = {"DATA_ROOT": "/data/", "NUM_LABELS": "5", "SECRET_TOKEN": "hunter2"}
    with caplog.at_level(logging.INFO, logger="rloss"):
        values, _ = variable_values({"NUM_LABELS": "7"}, None, environ)
    assert values == {"DATA_ROOT": "/data/", "NUM_LABELS": "7"}
    assert "DATA_ROOT=/data/" in caplog.text and "NUM_LABELS=5" not in caplog.text
    assert "hunter2" not in caplog.text
    assert "DATA_ROOT" in ENVIRONMENT_VARIABLES and "HOME" not in ENVIRONMENT_VARIABLES


def test_readers_do_not_read_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("DATA_ROOT", "/from/env/")
    net = tmp_path / "net.prototxt"
    net.write_text('name: "${DATA_ROOT}"\n')
    with pytest.raises(VariableError, match=r"\$\{DATA_ROOT\} has no value"):
        read_net(net)
    assert read_net(net, values={"DATA_ROOT": "/given/"}).name == "/given/"


def test_an_unknown_environment_variable_needs_set_and_the_message_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("RLOSS_TEST_SECRET", "hunter2")
    folder = tmp_path / "cfg"
    net = write_dataset(folder)
    net.write_text(net.read_text().replace('name: "tiny"', 'name: "${RLOSS_TEST_SECRET}"'))
    with pytest.raises(VariableError) as info:
        Solver(solver_file(folder, net=f'"{net}"'))
    message = str(info.value)
    assert "--set RLOSS_TEST_SECRET=" in message and "is not used" in message and "hunter2" not in message
    solver = Solver(solver_file(folder, net=f'"{net}"'), values={"RLOSS_TEST_SECRET": "visible"})
    solver.step(1)
    solver.snapshot()
    assert read_net_param(solver.snapshot_name(".caffemodel")).name == "visible"


def test_solver_obeys_its_environ_argument(tmp_path, monkeypatch):
    folder = tmp_path / "cfg"
    net = write_dataset(folder)
    net.write_text(net.read_text().replace(str(folder / "list.txt"), "${DATA_ROOT}list.txt"))
    solver_path = solver_file(folder, net=f'"{net}"')
    monkeypatch.setenv("DATA_ROOT", "/nowhere/")
    assert Solver(solver_path, environ={"DATA_ROOT": f"{folder}/"}).net.name == "tiny"
    monkeypatch.setenv("DATA_ROOT", f"{folder}/")
    with pytest.raises(VariableError, match="DATA_ROOT"):
        Solver(solver_path, environ={})
