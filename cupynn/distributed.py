"""Data-parallel training over MPI: every rank holds the whole model, and a step's
gradients are summed over the ranks in one ``MPI_Allreduce``.

``comm = cupynn.distributed.init()`` gives a :class:`Communicator`: MPI's world
communicator (through mpi4py) when the process was started by ``mpiexec`` /
``mpirun`` / ``srun``, else a one-rank communicator whose collectives do
nothing, so that the same script runs either way. ``cupynn.fit(..., comm=comm)``
then splits every global batch over the ranks in contiguous shards (the first
``batch % size`` ranks take one row more), weighs each rank's loss and
gradient by its share of the global batch, and all-reduces every gradient of
the step, packed into one flat buffer, in one call: Adam then runs identically
on every rank, and the model equals a one-process run's with the same global
batch up to the order of floating-point sums.

Truly sparse training exchanges ``nnz`` values per step where a masked-dense
data-parallel run (PyTorch DDP) all-reduces every dense weight: about the
density times as many bytes.

Device arrays go straight to MPI when it is CUDA-aware (``$CUPYNN_MPI_CUDA_AWARE=1``
says so where mpi4py cannot ask the library); otherwise they pass through one
host buffer that is kept and grown, never allocated per step.

Failure: a rank that raises inside :meth:`Communicator.guard` (``fit`` and the
scripts use it) prints its error and aborts the whole job, so that the other
ranks never wait forever in a collective.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import time
import traceback
from typing import Any, Iterator

import numpy

from .backend import backend_of

# Variables that the usual launchers set in every rank's environment.
LAUNCHER_VARIABLES = ("PMI_SIZE", "PMI_RANK", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK",
                      "MV2_COMM_WORLD_SIZE", "MPI_LOCALNRANKS")
CUDA_AWARE_ENV = "CUPYNN_MPI_CUDA_AWARE"
_HINT = ("pip install 'cupynn[mpi]' (mpi4py and the mpich wheel, which brings mpiexec), or "
         "mpi4py built against the cluster's MPI")


def shard(n: int, rank: int, size: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` of rank ``rank`` among ``size`` when ``n`` rows are split in
    contiguous shards: sizes differ by at most one, the larger ones first."""
    base, extra = divmod(int(n), int(size))
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def fingerprint(*arrays: Any, rows: int = 4096) -> str:
    """A short hash of arrays' shapes, dtypes and up to ``rows`` evenly spaced rows each:
    cheap enough for whole datasets, enough to tell different files apart."""
    digest = hashlib.sha256()
    for a in arrays:
        a = numpy.asarray(a)
        digest.update(f"{a.shape}{a.dtype.str}".encode())
        if a.shape and a.shape[0]:
            step = max(1, a.shape[0] // rows)
            digest.update(numpy.ascontiguousarray(a[::step]).tobytes())
    return digest.hexdigest()[:16]


def array_hash(array: Any) -> str:
    """SHA-256 of an array's bytes (host copy), its dtype and shape."""
    from .backend import to_numpy

    host = numpy.ascontiguousarray(to_numpy(array))
    digest = hashlib.sha256(f"{host.shape}{host.dtype.str}".encode())
    digest.update(host.tobytes())
    return digest.hexdigest()


class Communicator:
    """The ranks of one data-parallel run. This base class is the one-rank case.

    Attributes
    ----------
    rank, size : int
    cuda_aware : bool
        Whether device arrays are handed to MPI directly.
    """

    rank = 0
    size = 1
    cuda_aware = False

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def shard(self, n: int) -> tuple[int, int]:
        """This rank's contiguous share ``[start, stop)`` of ``n`` rows."""
        return shard(n, self.rank, self.size)

    # collectives: the one-rank versions do nothing
    def allreduce(self, array: Any, op: str = "sum") -> Any:
        """Reduce ``array`` over the ranks, in place (``op``: "sum" or "max"); returns it.

        ``array`` is a C-contiguous NumPy or CuPy array of float32/float64/int64.
        """
        _check_op(op)
        return array

    def bcast(self, obj: Any, root: int = 0) -> Any:
        """A picklable object (small: settings, decisions) from ``root`` to every rank."""
        return obj

    def allgather(self, obj: Any) -> list[Any]:
        """A picklable object from every rank, in rank order, on every rank."""
        return [obj]

    def allgather_array(self, array: Any) -> numpy.ndarray:
        """1-D arrays of any lengths from every rank, concatenated in rank order (host)."""
        from .backend import to_numpy

        return numpy.asarray(to_numpy(array))

    def barrier(self) -> None:
        """Wait until every rank gets here."""

    def abort(self, code: int = 1) -> None:
        """End every rank of the job (the one-rank version exits this process)."""
        raise SystemExit(code)

    # checks
    def check_same(self, what: str, settings: dict[str, Any]) -> None:
        """Raise (on every rank alike) when the ranks' ``settings`` differ, naming the keys."""
        gathered = self.allgather(json.loads(json.dumps(settings, default=str)))
        differ = sorted({key for other in gathered[1:]
                         for key in set(gathered[0]) | set(other)
                         if gathered[0].get(key) != other.get(key)})
        if differ:
            values = "; ".join(f"{key}: " + ", ".join(f"rank {r} {g.get(key)!r}"
                                                     for r, g in enumerate(gathered))
                               for key in differ)
            raise ValueError(f"The {self.size} ranks disagree on the {what}: {values}. Every "
                             f"rank must run the same configuration on the same data.")

    def check_identical_model(self, model: Any, when: str) -> None:
        """Raise when any rank's sparse pattern or values differ; names the layer."""
        if self.size == 1:
            return
        mine = []
        for layer in model.layers:
            names = (("indptr", "indices", "data") if hasattr(layer, "indptr")
                     else ("weight",))
            mine.append([array_hash(getattr(layer, name)) for name in names])
        gathered = self.allgather(mine)
        for index in range(len(mine)):
            for which, name in enumerate(("indptr", "indices", "data")
                                         if hasattr(model.layers[index], "indptr")
                                         else ("weight",)):
                hashes = [g[index][which] for g in gathered]
                if len(set(hashes)) > 1:
                    ranks = [r for r, h in enumerate(hashes) if h != hashes[0]]
                    raise RuntimeError(
                        f"The ranks' models diverged {when}: layer {index}'s {name} differs "
                        f"on rank(s) {ranks} from rank 0. The ranks must take identical "
                        f"decisions; this is a bug (or an MPI whose reductions differ by rank).")

    @contextlib.contextmanager
    def guard(self, alike: tuple[type[BaseException], ...] = ()) -> Iterator["Communicator"]:
        """Abort every rank when this one raises, so that none waits forever.

        With one rank the exception simply propagates. With several, the rank
        prints its error (with its traceback) to stderr and calls
        ``MPI_Abort``, which ends every rank of the job with a non-zero status;
        an exit with status 0 passes, and so do the exception types in
        ``alike``: errors that every rank raises at the same point (such as a
        NaN in the all-reduced loss), which the caller handles on every rank.
        """
        try:
            yield self
        except alike:
            raise
        except SystemExit as exc:
            if self.size == 1 or exc.code in (0, None):
                raise
            message = exc.code if isinstance(exc.code, str) else ""
            self._die(message, 2 if isinstance(exc.code, str) else int(exc.code))
        except BaseException as exc:
            if self.size == 1:
                raise
            text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
            self._die(text.rstrip(), 130 if isinstance(exc, KeyboardInterrupt) else 1)

    def _die(self, message: str, code: int) -> None:
        if message:
            prefix = f"[rank {self.rank} of {self.size}] "
            print(prefix + message.replace("\n", "\n" + prefix), file=sys.stderr, flush=True)
        self.abort(code)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rank={self.rank}, size={self.size})"


class SingleProcess(Communicator):
    """The one-rank communicator of a process not started by an MPI launcher."""


_OPS = ("sum", "max")


def _check_op(op: str) -> None:
    if op not in _OPS:
        raise ValueError(f"The 'op' parameter of allreduce must be one of {list(_OPS)}. "
                         f"Got {op!r} instead.")


class MPICommunicator(Communicator):
    """MPI's world communicator through mpi4py (see the module doc)."""

    def __init__(self, mpi: Any, comm: Any = None, cuda_aware: bool | None = None) -> None:
        self.MPI = mpi
        self.comm = comm if comm is not None else mpi.COMM_WORLD
        self.rank = int(self.comm.Get_rank())
        self.size = int(self.comm.Get_size())
        self.cuda_aware = _cuda_aware(mpi) if cuda_aware is None else bool(cuda_aware)
        self._host = numpy.empty(0, dtype=numpy.uint8)  # staging for device arrays, kept
        self.reductions = 0  # allreduce calls made, their bytes and seconds (benchmarks read them)
        self.reduced_bytes = 0
        self.reduce_seconds = 0.0

    def _staging(self, nbytes: int) -> numpy.ndarray:
        if self._host.nbytes < nbytes:
            self._host = numpy.empty(max(nbytes, 2 * self._host.nbytes), dtype=numpy.uint8)
        return self._host[:nbytes]

    def allreduce(self, array: Any, op: str = "sum") -> Any:
        _check_op(op)
        if not array.flags.c_contiguous:
            raise ValueError("Communicator.allreduce needs a C-contiguous array.")
        mpi_op = self.MPI.SUM if op == "sum" else self.MPI.MAX
        self.reductions += 1
        self.reduced_bytes += int(array.nbytes)
        begin = time.perf_counter()
        backend = backend_of(array)
        if not backend.is_gpu:
            self.comm.Allreduce(self.MPI.IN_PLACE, array, op=mpi_op)
        else:
            backend.synchronize()  # MPI knows nothing of CUDA streams
            if self.cuda_aware:
                self.comm.Allreduce(self.MPI.IN_PLACE, array, op=mpi_op)
            else:
                host = self._staging(array.nbytes).view(array.dtype).reshape(array.shape)
                array.get(out=host)
                self.comm.Allreduce(self.MPI.IN_PLACE, host, op=mpi_op)
                array.set(host)
        self.reduce_seconds += time.perf_counter() - begin
        return array

    def bcast(self, obj: Any, root: int = 0) -> Any:
        return self.comm.bcast(obj, root=root)

    def allgather(self, obj: Any) -> list[Any]:
        return self.comm.allgather(obj)

    def allgather_array(self, array: Any) -> numpy.ndarray:
        from .backend import to_numpy

        local = numpy.ascontiguousarray(to_numpy(array)).reshape(-1)
        counts = self.comm.allgather(int(local.shape[0]))
        dtypes = set(self.comm.allgather(local.dtype.str))
        if len(dtypes) != 1:
            raise ValueError(f"allgather_array: the ranks' arrays have different dtypes {dtypes}.")
        out = numpy.empty(sum(counts), dtype=local.dtype)
        self.comm.Allgatherv(local, [out, counts])
        return out

    def barrier(self) -> None:
        self.comm.Barrier()

    def abort(self, code: int = 1) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        self.comm.Abort(int(code) or 1)


def _cuda_aware(mpi: Any) -> bool:
    text = os.environ.get(CUDA_AWARE_ENV, "").strip().lower()
    if text in ("1", "true", "yes"):
        return True
    if text in ("0", "false", "no"):
        return False
    query = getattr(mpi, "Query_cuda_support", None)
    try:
        return bool(query()) if query is not None else False
    except Exception:  # an MPI without the query
        return False


def find_mpiexec() -> str | None:
    """The ``mpiexec`` to start ranks with: the one beside this Python (the mpich wheel puts
    it in the environment's bin/), else the first on PATH; None when there is none or
    mpi4py cannot be imported."""
    import importlib.util
    import shutil

    if importlib.util.find_spec("mpi4py") is None:
        return None
    beside = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return beside if os.path.exists(beside) else shutil.which("mpiexec")


def launcher_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: this process's environment) for starting ranks with
    :func:`find_mpiexec`'s launcher: as root, Open MPI's ``mpiexec`` refuses to
    start unless told that this is meant (containers and lent machines run as
    root); its two variables say so, and MPICH ignores them."""
    out = dict(os.environ if env is None else env)
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        out.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
        out.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    return out


def launched_by_mpi() -> bool:
    """Whether an MPI launcher (mpiexec, mpirun, srun) started this process."""
    return any(os.environ.get(name) for name in LAUNCHER_VARIABLES)


_WORLD: list[Communicator] = []


def init(*, force_mpi: bool = False) -> Communicator:
    """The communicator of this process (made once, then returned again).

    MPI's world communicator when an MPI launcher started the process (or with
    ``force_mpi``), else a one-rank :class:`SingleProcess`, without importing
    mpi4py.

    Raises
    ------
    ImportError
        When launched by MPI but mpi4py cannot be imported (the message says
        what to install).
    """
    if _WORLD:
        return _WORLD[0]
    if not (force_mpi or launched_by_mpi()):
        _WORLD.append(SingleProcess())
        return _WORLD[0]
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise ImportError(f"This process was started by an MPI launcher, but mpi4py cannot be "
                          f"imported ({exc}). {_HINT}.") from None
    world = MPICommunicator(MPI)
    _WORLD.append(world if world.size > 1 else SingleProcess())
    return _WORLD[0]


def as_communicator(comm: Any, owner: str = "fit") -> Communicator:
    """``None`` as the one-rank communicator; a Communicator as it is; else an error."""
    if comm is None:
        return SingleProcess()
    if not isinstance(comm, Communicator):
        raise TypeError(f"The 'comm' parameter of {owner} must be a cupynn.distributed."
                        f"Communicator (from cupynn.distributed.init()). Got "
                        f"{type(comm).__name__} instead.")
    return comm


class GradientReducer:
    """Packs a model's gradients (and the batch loss) into one flat buffer, all-reduces it
    in one call, and points every gradient at its part of the result.

    The buffer is kept while the layout (the parameters' sizes) stays the same.
    """

    def __init__(self, comm: Communicator) -> None:
        self.comm = comm
        self._buffer: Any = None
        self._layout: tuple[int, ...] = ()

    def reduce(self, model: Any, loss: Any) -> Any:
        """Sum every ``grad_*`` of ``model`` and the 0-d ``loss`` over the ranks; returns the
        summed loss (0-d, on the device). Each gradient becomes a view of the buffer."""
        xp = model.backend.xp
        grads = [(layer, name, grad) for layer in model.layers
                 for name, _, grad in layer.parameters()]
        layout = tuple(int(g.size) for _, _, g in grads)
        total = sum(layout) + 1
        if self._buffer is None or layout != self._layout or self._buffer.dtype != model.dtype:
            self._buffer = xp.empty(total, dtype=model.dtype)
            self._layout = layout
        buffer = self._buffer
        offset = 0
        for _, _, grad in grads:
            buffer[offset:offset + grad.size] = grad.reshape(-1)
            offset += grad.size
        buffer[offset] = loss
        self.comm.allreduce(buffer)
        offset = 0
        for layer, name, grad in grads:
            setattr(layer, "grad_" + name, buffer[offset:offset + grad.size].reshape(grad.shape))
            offset += grad.size
        return buffer[offset].astype(numpy.float64)
