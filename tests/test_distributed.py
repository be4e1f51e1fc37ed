"""Data-parallel training over MPI (cupynn.distributed).

The central claim: R ranks with global batch B end with the model one process
trains with batch B (CPU, float64, every algorithm, 3 epochs with a
redistribution after each, uneven and empty shards) — run for real under
``mpiexec -n 2`` and ``-n 3`` (tests/mpi_worker.py, a subprocess under a
timeout). Also: a rank that fails ends the whole job with its message and
never hangs; ranks that disagree on the configuration are told which setting
differs; and the pieces (shards, the gradient packing, loss shares, the
checks) on their own.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import numpy
import pytest

import cupynn
from cupynn import distributed
from cupynn.distributed import Communicator, SingleProcess, shard
from cupynn.step import GradientReducer
from cupynn.losses import binary_cross_entropy, cross_entropy

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import mpi_worker  # noqa: E402

IN_CI = os.environ.get("CI", "").strip().lower() in ("true", "1")
MPI_TIMEOUT = 180


def mpiexec() -> str:
    """The mpiexec beside this Python (the mpich wheel's), else on PATH; skip (fail in CI)."""
    found = distributed.find_mpiexec()
    if found is None:
        reason = "needs mpi4py and mpiexec (pip install -e '.[mpi]')"
        if IN_CI:
            pytest.fail(f"{reason}; CI installs the mpi extra, so this test must run.")
        pytest.skip(reason)
    return found


JOB_VARIABLE = "CUPYNN_TEST_MPI_JOB"  # marks a job's ranks, to end them all on a timeout


def start(ranks: int, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """``mpiexec -n ranks python tests/mpi_worker.py ARGS`` in a session of its own."""
    env = distributed.launcher_env(dict(os.environ, NUMBA_NUM_THREADS="1", OMP_NUM_THREADS="1",
                                        **(env or {})))
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), env.get("PYTHONPATH", "")])
    env[JOB_VARIABLE] = uuid.uuid4().hex
    job = subprocess.Popen([mpiexec(), "-n", str(ranks), sys.executable,
                            str(HERE / "mpi_worker.py"), *args], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, env=env, cwd=HERE.parent,
                           start_new_session=True)
    job.tag = env[JOB_VARIABLE]
    return job


def finish(job: subprocess.Popen, timeout: float = MPI_TIMEOUT) -> subprocess.CompletedProcess:
    """Wait for a job; past ``timeout`` end it, every rank included, and fail."""
    try:
        stdout, stderr = job.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        end_job(job)
        stdout, stderr = job.communicate()
        pytest.fail(f"the MPI job ran past {timeout} s and was ended:\n{stdout[-2000:]}"
                    f"\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(job.args, job.returncode, stdout, stderr)


def end_job(job: subprocess.Popen) -> None:
    """SIGTERM to mpiexec (which ends its ranks), then SIGKILL to whatever of the job is left:
    its process group, and the ranks (each in a session of its own) found by their tag."""
    job.terminate()
    try:
        job.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(job.pid, signal.SIGKILL)
    marker = f"{JOB_VARIABLE}={job.tag}".encode()
    for entry in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            if marker in (entry / "environ").read_bytes().split(b"\0"):
                os.kill(int(entry.name), signal.SIGKILL)


def launch(ranks: int, *args: str, timeout: float = MPI_TIMEOUT,
           env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return finish(start(ranks, *args, env=env), timeout)


@pytest.fixture(scope="module", params=[2, 3], ids=["2-ranks", "3-ranks"])
def trained(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"mpi{request.param}")
    done = launch(request.param, "train", str(out))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return request.param, out


@pytest.mark.parametrize("name", list(mpi_worker.configs()))
def test_ranks_train_the_one_process_model(trained, name):
    ranks, out = trained
    got = mpi_worker.compare(out, name)
    assert got["ranks"] == ranks and got["histories_equal"], "ranks returned different histories"
    assert got["epochs"] == (mpi_worker.RUN_EPOCHS, mpi_worker.RUN_EPOCHS)
    assert got["topology_equal"] and got["same_moves"]
    assert got["weight_rel_diff"] <= 1e-9, got
    assert got["history_rel_diff"] <= 1e-9, got
    if name not in ("static", "dense"):
        assert len(got["moved"]) == mpi_worker.RUN_EPOCHS and min(got["moved"]) > 0


def test_a_failing_rank_ends_every_rank_with_its_message(tmp_path):
    done = launch(2, "fault", str(tmp_path))
    assert done.returncode != 0
    assert "this rank lost its copy of the data" in done.stderr
    assert "[rank 1 of 2]" in done.stderr


def test_ranks_that_disagree_are_told_what_differs(tmp_path):
    done = launch(2, "mismatch", str(tmp_path))
    assert done.returncode != 0
    assert "The 2 ranks disagree on the configuration: optimizer:" in done.stderr
    assert "'lr': 0.02" in done.stderr and "'lr': 0.03" in done.stderr


def higgs_args(data_dir: Path, out: Path) -> list[str]:
    return ["--data-dir", str(data_dir), "--epochs", "4", "--train-samples", "1500",
            "--val-samples", "400", "--hidden", "24", "--batch-size", "64", "--dtype", "float64",
            "--device", "cpu", "--algorithm", "gradient-global", "--no-cache", "--quiet",
            "--out", str(out)]


def test_script_checkpoint_from_two_ranks_resumes_on_one_exactly(tmp_path):
    """mpiexec -n 2 train_higgs.py, Ctrl-C on rank 0 in epoch 3: every rank ends as one
    process does (status 130, the summary written, no traceback), the checkpoint of
    epoch 2 stays whole; one process resumes it and ends where an uninterrupted
    one-process run ends."""
    from conftest import shared_data
    from cupynn.paper.experiments import HIGGS, run

    data = shared_data("higgs")
    part, whole = tmp_path / "part", tmp_path / "whole"
    done = launch(2, "script-interrupt", "higgs", *higgs_args(data, part))
    assert done.returncode == 130, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert "interrupted during epoch 3; the last good checkpoint (after epoch 2)" in done.stderr
    assert json.loads((part / "summary.json").read_text())["status"] == "interrupted"
    config = json.loads((part / "config.json").read_text())
    assert config["ranks"] == 2
    assert len((part / "metrics.jsonl").read_text().splitlines()) == 2  # rank 0 alone wrote
    assert run(HIGGS, ["--resume", str(part), "--quiet"]) == 0
    assert run(HIGGS, higgs_args(data, whole)) == 0
    assert_same_run(part, whole)


def assert_same_run(part: Path, whole: Path) -> None:
    """The resumed run ``part`` ended where the uninterrupted ``whole`` did: the same
    metrics (within 1e-9) and topology, weights within 1e-9."""
    resumed = [json.loads(line) for line in (part / "metrics.jsonl").read_text().splitlines()]
    straight = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in resumed] == [m["epoch"] for m in straight]
    assert [m["epoch"] for m in straight] == list(range(1, len(straight) + 1))
    for a, b in zip(resumed, straight):
        for key in ("train_loss", "test_loss", "test_auc", "induced_loss_after"):
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-9), (a["epoch"], key)
        assert a["nnz"] == b["nnz"]
    final = [dict(numpy.load(d / "checkpoint.npz")) for d in (part, whole)]
    for key in final[1]:
        if key.startswith("model/") and key.endswith(("indptr", "indices")):
            numpy.testing.assert_array_equal(final[0][key], final[1][key])
        elif key.startswith("model/"):
            numpy.testing.assert_allclose(final[0][key], final[1][key], rtol=1e-9, atol=1e-12)


def test_script_under_mpi_writes_one_run(tmp_path):
    from conftest import shared_data

    data = shared_data("kmnist")
    out = tmp_path / "kmnist"
    done = launch(2, "script", "kmnist", "--data-dir", str(data), "--train-from-test", "0.2",
                  "--epochs", "2", "--hidden", "32", "--batch-size", "128", "--device", "cpu",
                  "--algorithm", "loss", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["epochs_completed"] == 2
    assert json.loads((out / "config.json").read_text())["ranks"] == 2
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    assert done.stdout.count("results in") == 1  # only the first rank reports


# ----------------------------------------------------------------- the pieces
@pytest.mark.parametrize("n, size", [(0, 3), (1, 3), (10, 3), (48, 2), (47, 5), (5, 5)])
def test_shards_cover_the_rows_in_order(n, size):
    bounds = [shard(n, r, size) for r in range(size)]
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    lengths = [stop - start for start, stop in bounds]
    assert max(lengths) - min(lengths) <= 1 and lengths == sorted(lengths, reverse=True)


def test_one_process_without_a_launcher(monkeypatch):
    for name in distributed.LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(distributed, "_WORLD", [])
    comm = distributed.init()
    assert isinstance(comm, SingleProcess) and (comm.rank, comm.size) == (0, 1)
    assert distributed.init() is comm
    a = numpy.arange(4.0)
    assert comm.allreduce(a) is a and list(a) == [0, 1, 2, 3]
    assert comm.bcast({"x": 1}) == {"x": 1} and comm.allgather(5) == [5]
    assert comm.shard(7) == (0, 7)
    with pytest.raises(ValueError, match=r"must be one of \['sum', 'max'\]"):
        comm.allreduce(a, op="min")
    with pytest.raises(TypeError, match="must be a cupynn.distributed.Communicator"):
        distributed.as_communicator("world")


def test_a_launcher_without_mpi4py_says_what_to_install(monkeypatch):
    monkeypatch.setattr(distributed, "_WORLD", [])
    monkeypatch.setenv("PMI_SIZE", "2")
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # import fails
    with pytest.raises(ImportError, match=r"started by an MPI launcher.*cupynn\[mpi\]"):
        distributed.init()


class TwoAlike(Communicator):
    """Two ranks holding the same values, simulated in one process: sums double."""

    size = 2

    def __init__(self, others=None):
        self.others = others or []

    def allreduce(self, array, op="sum"):
        if op == "sum":
            array *= 2
        return array

    def allgather(self, obj):
        return [obj, *self.others] if self.others else [obj, obj]


def test_the_gradient_reducer_packs_everything_in_one_buffer():
    model = cupynn.MLP([6, 5, 2], density=0.5, dense_layers=(-1,), dtype="float64", device="cpu")
    logits = model.forward(numpy.random.default_rng(0).standard_normal((4, 6)))
    value, grad = cross_entropy(logits, numpy.array([0, 1, 1, 0]))
    model.backward(grad, need_input_grad=False)
    before = [g.copy() for layer in model.layers for _, _, g in layer.parameters()]
    reducer = GradientReducer(TwoAlike())
    total = reducer.reduce(model, value)
    assert float(total) == pytest.approx(2 * float(value))
    after = [g for layer in model.layers for _, _, g in layer.parameters()]
    for a, b in zip(before, after):
        numpy.testing.assert_array_equal(b, 2 * a)
        assert numpy.shares_memory(b, reducer._buffer)  # views of the one buffer
    assert reducer._buffer.shape == (sum(a.size for a in before) + 1,)


def test_check_same_names_the_settings_that_differ():
    comm = TwoAlike(others=[{"lr": 0.1, "seed": 1, "extra": True}])
    comm.check_same("x", {"lr": 0.1, "seed": 1, "extra": True})  # the same: passes
    with pytest.raises(ValueError, match=r"disagree on the setup: extra: rank 0 None, rank 1 "
                                         r"True; seed: rank 0 2, rank 1 1"):
        comm.check_same("setup", {"lr": 0.1, "seed": 2})


def test_check_same_takes_nan_for_nan():
    """Canonical text per key: NaN equals NaN (``nan != nan`` made every rank given
    ``--lr nan`` disagree), at any depth and in any key order; a missing key still
    differs from one set to None."""
    nan = float("nan")
    settings = {"--lr": nan, "--scale": [nan, nan], "opt": {"b": nan, "a": 1}}
    TwoAlike(others=[json.loads(json.dumps(settings))]).check_same("x", settings)
    TwoAlike(others=[{"opt": {"a": 1, "b": nan}, "--scale": [nan, nan], "--lr": nan}]
             ).check_same("x", settings)
    with pytest.raises(distributed.RanksDisagree, match=r"--lr: rank 0 nan, rank 1 0\.1\. Every"):
        TwoAlike(others=[{**settings, "--lr": 0.1}]).check_same("x", settings)
    with pytest.raises(distributed.RanksDisagree, match=r"^The 2 ranks disagree on the x: "
                                                        r"extra: rank 0 None, rank 1 None\."):
        TwoAlike(others=[{**settings, "extra": None}]).check_same("x", settings)


def test_alike_errors_pass_the_guard_of_several_mpi_ranks():
    """Errors raised by every rank alike (RaisedAlike) propagate through ``guarded`` on
    every rank; any other error aborts the job."""
    aborted = []

    class Ranks(distributed.MPICommunicator):
        def __init__(self):
            self.rank, self.size = 1, 2

        def abort(self, code=1):
            aborted.append(code)
            raise SystemExit(code)

    @distributed.guarded
    def check(error, comm=None):
        raise error

    for error in (distributed.UnsupportedAcrossRanks("no"), distributed.RanksDisagree("no")):
        assert isinstance(error, (ValueError, distributed.RaisedAlike))
        with pytest.raises(type(error)):
            check(error, comm=Ranks())
    assert aborted == []
    with pytest.raises(SystemExit):
        check(ValueError("one rank only"), comm=Ranks())
    assert aborted == [1]


def test_diverged_models_are_named_by_layer():
    model = cupynn.MLP([6, 5, 2], density=0.5, device="cpu")
    other = cupynn.MLP([6, 5, 2], density=0.5, device="cpu")
    other.layers[1].data[0] += 1

    def hashes(m):
        return [[distributed.array_hash(getattr(layer, n)) for n in ("indptr", "indices", "data")]
                for layer in m.layers]

    TwoAlike(others=[hashes(model)]).check_identical_model(model, "now")
    with pytest.raises(RuntimeError, match=r"diverged now: layer 1's data differs on rank\(s\) "
                                           r"\[1\]"):
        TwoAlike(others=[hashes(other)]).check_identical_model(model, "now")


@pytest.mark.parametrize("loss, labels", [
    (cross_entropy, numpy.array([0, 2, 1, 1, 0, 2, 2])),
    (binary_cross_entropy, numpy.array([0, 1, 1, 0, 1, 0, 1.0])),
])
def test_loss_shares_add_up_to_the_mean(loss, labels):
    rng = numpy.random.default_rng(3)
    logits = rng.standard_normal((7, 3 if loss is cross_entropy else 1))
    whole, whole_grad = loss(logits, labels)
    parts = [loss(logits[a:b], labels[a:b], total=7) for a, b in [(0, 3), (3, 5), (5, 7), (7, 7)]]
    assert sum(float(v) for v, _ in parts) == pytest.approx(float(whole), rel=1e-14)
    numpy.testing.assert_allclose(numpy.concatenate([g for _, g in parts]), whole_grad,
                                  rtol=1e-14)
    with pytest.raises(ValueError, match="must be an int >= the batch size 7"):
        loss(logits, labels, total=6)


def test_loss_share_gradient_is_the_derivative():
    """Gradient check of a share: d(sum over rows / total) / d logits."""
    from gradcheck import assert_close_gradient, numeric_gradient

    rng = numpy.random.default_rng(4)
    logits, labels = rng.standard_normal((3, 4)), numpy.array([1, 3, 0])
    _, grad = cross_entropy(logits, labels, total=10)
    numeric = numeric_gradient(lambda: float(cross_entropy(logits, labels, total=10)[0]), logits)
    assert_close_gradient(grad, numeric, "cross_entropy share")


def test_augment_without_rows_is_refused_with_several_ranks():
    model = cupynn.MLP([4, 3, 2], density=0.5, device="cpu")
    x, y = numpy.zeros((10, 4)), numpy.zeros(10, int)
    with pytest.raises(TypeError, match="must take rows= and total="):
        cupynn.Trainer(model, cupynn.Adam(model), (x, y), epochs=1, batch_size=5,
                       augment=lambda xb, rng: xb, comm=TwoAlike())


def test_launcher_env_lets_open_mpi_start_as_root(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    env = distributed.launcher_env({"PATH": "/bin"})
    assert env["OMPI_ALLOW_RUN_AS_ROOT"] == env["OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"] == "1"
    assert env["PATH"] == "/bin"
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert "OMPI_ALLOW_RUN_AS_ROOT" not in distributed.launcher_env({"PATH": "/bin"})
