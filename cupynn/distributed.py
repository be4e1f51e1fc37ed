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

Failure ends the whole job promptly, never a hang: a rank that raises inside
:meth:`Communicator.guard` (``fit``, ``Trainer`` and the scripts use it) prints
its error and aborts the job (an error that every rank raises alike,
:class:`RaisedAlike`, propagates on every rank instead); ``init()`` installs an
excepthook that does the same for an exception that nothing catches anywhere in
the program (as ``python -m mpi4py`` does); a Ctrl-C stops every rank alike. Every collective
first waits, polling, until every rank has arrived at it, at most ``timeout``
seconds (``init(timeout=...)``, ``$CUPYNN_MPI_TIMEOUT``, default
:data:`DEFAULT_TIMEOUT`), then names the ranks that did not arrive and aborts.

Why this file is long (~700 lines): the communicators' collectives and their
failure handling (the arrival check's side channel, the collective count, the
guard, the excepthook, interrupts) are one state machine around one MPI
communicator; split, each part would reach into the others' private state.
The training step's gradient all-reduce is :class:`cupynn.step.GradientReducer`.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import signal
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
TIMEOUT_ENV = "CUPYNN_MPI_TIMEOUT"
# Seconds a rank waits at a collective for the others before it ends the job (as
# torch.distributed's watchdog): long enough for the first rank's checkpoint or a slow
# epoch's end, short enough that a lost rank does not hold a cluster allocation for hours.
DEFAULT_TIMEOUT = 600.0
# Seconds that a rank told of an interrupt waits for the first rank to end the job (after
# the first rank writes its files) before it ends the job itself.
INTERRUPT_GRACE = 30.0
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


class RaisedAlike(Exception):
    """Base of the errors that every rank raises alike: from the same check of settings
    that every rank shares, before any rank can be left waiting in a collective.

    :meth:`Communicator.guard` and :func:`guarded` let them propagate on every rank (the
    caller may catch them) instead of ending the job. Checks of what one rank alone holds
    (its data, its files) must not raise them."""


class RanksDisagree(RaisedAlike, ValueError):
    """The ranks were given different settings or data; raised on every rank alike."""


class UnsupportedAcrossRanks(RaisedAlike, ValueError):
    """What data-parallel training does not support (yet), such as ``fit``'s
    ``sample_weight``; raised on every rank alike, before any collective."""


class Interrupted(KeyboardInterrupt):
    """Another rank was interrupted (Ctrl-C): this rank stops as if it had been too."""


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
    timeout = DEFAULT_TIMEOUT

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

    def barrier(self, timeout: float | None = None) -> None:
        """Wait until every rank gets here: at most ``timeout`` seconds (None: the
        communicator's; ``math.inf``: no limit)."""

    def abort(self, code: int = 1) -> None:
        """End every rank of the job (the one-rank version exits this process)."""
        raise SystemExit(code)

    def tell_interrupted(self) -> None:
        """Tell the other ranks that this one was interrupted: each raises
        :class:`Interrupted` at its next collective (nothing to tell with one rank)."""

    def end_interrupted(self, code: int = 130) -> int:
        """After an interrupt on every rank: the first rank (once it has written its files)
        ends the job with status ``code``; the others wait for that. One rank: returns
        ``code``."""
        return code

    # checks
    def check_same(self, what: str, settings: dict[str, Any]) -> None:
        """Raise (on every rank alike) when the ranks' ``settings`` differ, naming the keys."""
        gathered = self.allgather(json.loads(json.dumps(settings, default=str)))

        def text(g: dict[str, Any], key: str) -> str | None:
            """A value as canonical JSON: equal values give equal text, NaN included
            (``nan != nan``, but both are ``NaN``)."""
            return json.dumps(g[key], sort_keys=True, default=str) if key in g else None

        differ = sorted({key for other in gathered[1:]
                         for key in set(gathered[0]) | set(other)
                         if text(gathered[0], key) != text(other, key)})
        if differ:
            values = "; ".join(f"{key}: " + ", ".join(f"rank {r} {g.get(key)!r}"
                                                     for r, g in enumerate(gathered))
                               for key in differ)
            raise RanksDisagree(f"The {self.size} ranks disagree on the {what}: {values}. "
                                f"Every rank must run the same configuration on the same data.")

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
        NaN in the all-reduced loss), which the caller handles on every rank
        (:func:`guarded` passes :class:`RaisedAlike`).
        A ``KeyboardInterrupt`` is told to the other ranks (each raises
        :class:`Interrupted` at its next collective) and propagates, so that
        every rank stops as one process does; one that nothing catches ends
        the job with status 130 through :func:`init`'s excepthook.
        """
        try:
            yield self
        except alike:
            raise
        except KeyboardInterrupt as exc:
            if self.size > 1 and not isinstance(exc, Interrupted):
                self.tell_interrupted()
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
            self._die(text.rstrip(), 1)

    def _die(self, message: str, code: int) -> None:
        if message:
            prefix = f"[rank {self.rank} of {self.size}] "
            print(prefix + message.replace("\n", "\n" + prefix), file=sys.stderr, flush=True)
        self.abort(code)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rank={self.rank}, size={self.size})"


def guarded(function: Any) -> Any:
    """Decorator: run ``function`` inside the guard of its ``comm`` argument.

    With an MPI world of several ranks, an error in it — a check that fails
    on one rank only, say, before the first collective — ends the job, even
    where the caller would catch it, instead of leaving the other ranks
    waiting there; a :class:`RaisedAlike` (:class:`RanksDisagree`,
    :class:`UnsupportedAcrossRanks`), raised on every rank alike, propagates
    on every rank. Other communicators (one rank; ranks simulated in one
    process, as tests do) see the error as it is."""
    import inspect

    signature = inspect.signature(function)

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            comm = signature.bind_partial(*args, **kwargs).arguments.get("comm")
        except TypeError:  # arguments it does not take: the function says so itself
            comm = None
        if not isinstance(comm, MPICommunicator) or comm.size == 1:
            return function(*args, **kwargs)
        with comm.guard(alike=(RaisedAlike,)):
            return function(*args, **kwargs)

    return wrapper


class SingleProcess(Communicator):
    """The one-rank communicator of a process not started by an MPI launcher."""


_OPS = ("sum", "max")


def _check_op(op: str) -> None:
    if op not in _OPS:
        raise ValueError(f"The 'op' parameter of allreduce must be one of {list(_OPS)}. "
                         f"Got {op!r} instead.")


# Tags of the side channel (a duplicate of the world communicator, so that these messages
# never meet a collective's or the user's): "where are you?", its answer, "I was interrupted".
_QUERY, _ANSWER, _INTERRUPT = 1, 2, 3
# Collective kinds, compared on arrival: ranks at different calls are told so, not left to
# hang or to mix their buffers.
_KINDS = {"allreduce": 1, "bcast": 2, "allgather": 3, "allgather_array": 4, "barrier": 5}
_SPIN_SECONDS = 0.01  # how long a wait polls without sleeping (a step's usual imbalance)
_ANSWER_SECONDS = 2.0  # how long a timed-out rank waits for the others to say where they are
# MPI_Abort ends the launcher's processes at once, and a launcher may end with output it
# had not yet read from a rank's pipe (MPICH's hydra once lost the timeout message this
# way); an aborting rank waits this long after flushing its output.
_FORWARD_SECONDS = 0.5


class MPICommunicator(Communicator):
    """MPI's world communicator through mpi4py (see the module doc).

    Every collective first waits until every rank has arrived at it: a
    non-blocking all-reduce (``MPI_Iallreduce``) of what the rank calls (its
    kind, its size, and the count of collectives so far) is polled — spinning
    for 10 ms, then sleeping 1 ms between polls — at most ``timeout``
    seconds; then the collective itself runs, blocking, as before (the same
    reduction, so the same bits). While it waits a rank answers the others'
    questions on a side channel (where it is) and hears of their interrupts.
    When the time is up it asks every rank where it is, waits two seconds for
    the answers, prints the ranks that did not arrive and aborts the job.
    """

    def __init__(self, mpi: Any, comm: Any = None, cuda_aware: bool | None = None,
                 timeout: float = DEFAULT_TIMEOUT) -> None:
        self.MPI = mpi
        self.comm = comm if comm is not None else mpi.COMM_WORLD
        self.rank = int(self.comm.Get_rank())
        self.size = int(self.comm.Get_size())
        self.cuda_aware = _cuda_aware(mpi) if cuda_aware is None else bool(cuda_aware)
        self.timeout = timeout
        self.side = self.comm.Dup()  # collective: every rank makes it in init()
        self.count = 0  # collectives called so far
        self._where = "no collective yet"
        self._pending: list[Any] = []  # arrival requests and buffers, kept alive until done
        self._sends: list[Any] = []
        self._answers: dict[int, tuple[int, str]] = {}
        self._critical = False  # inside a collective that every rank has entered
        self._interrupted = False  # a Ctrl-C came while critical; raised after it
        self._host = numpy.empty(0, dtype=numpy.uint8)  # staging for device arrays, kept
        self.reductions = 0  # allreduce calls made, their bytes and seconds (benchmarks read them)
        self.reduced_bytes = 0
        self.reduce_seconds = 0.0

    # ------------------------------------------------------------ waiting
    def _collective(self, kind: str, size: int, call: Any, timeout: float | None = None) -> Any:
        """Wait until every rank has arrived at this collective, then ``call()`` it.

        A Ctrl-C while a rank is inside the collective proper (every rank has
        entered it, so it ends at once) is raised right after it, never in
        the middle: no rank is left alone inside a collective."""
        self.count += 1
        self._where = f"{kind} (collective #{self.count})"
        try:
            self._arrive(kind, size, self.timeout if timeout is None else timeout)
            result = call()  # every rank has arrived: this ends at once
        finally:
            self._critical = False
        if self._interrupted:
            self._interrupted = False
            raise KeyboardInterrupt
        return result

    def _arrive(self, kind: str, size: int, timeout: float) -> None:
        mine = numpy.array([_KINDS[kind], size, self.count], dtype=numpy.int64)
        both = numpy.concatenate([mine, -mine])  # max of both halves: the max and -the min
        request = self.comm.Iallreduce(self.MPI.IN_PLACE, both, op=self.MPI.MAX)
        self._pending = [request, both]
        self._wait(request, timeout)
        self._pending = []
        high, low = both[:3], -both[3:]
        if (high != low).any():  # every rank sees the same high and low: raised alike
            names = {v: k for k, v in _KINDS.items()}
            raise RuntimeError(
                f"The ranks called different collectives: this rank (rank {self.rank}) is at "
                f"its collective #{self.count}, {kind} of {size} element(s); among the ranks "
                f"the calls range over {sorted({names.get(int(low[0])), names.get(int(high[0]))})}"
                f", sizes {int(low[1])} to {int(high[1])}, collective #{int(low[2])} to "
                f"#{int(high[2])}. Every rank must make the same calls in the same order.")

    def _wait(self, request: Any, timeout: float) -> None:
        begin = time.monotonic()
        spin_until = begin + _SPIN_SECONDS
        deadline = begin + timeout
        while not self._done(request):
            now = time.monotonic()
            if now < spin_until:
                continue
            self._serve()
            if now >= deadline:
                if self._timed_out(request, timeout):
                    return
            time.sleep(0.001)

    def _done(self, request: Any) -> bool:
        """Whether every rank has arrived. From the moment they have, this rank is inside
        the collective: a Ctrl-C then waits for its end (``_critical`` is set before the
        test, so that none can come between the test and the collective)."""
        self._critical = True
        if request.Test():
            return True
        self._critical = False
        if self._interrupted:  # came during the test
            self._interrupted = False
            raise KeyboardInterrupt
        return False

    def _serve(self) -> None:
        """Answer the other ranks' questions; raise :class:`Interrupted` when one was."""
        status = self.MPI.Status()
        while self.side.Iprobe(source=self.MPI.ANY_SOURCE, tag=self.MPI.ANY_TAG, status=status):
            source, tag = status.Get_source(), status.Get_tag()
            message = self.side.recv(source=source, tag=tag)
            if tag == _QUERY:
                self._send(source, _ANSWER, (message, self.count, self._where))
            elif tag == _ANSWER and message[0] == self.count:
                self._answers[source] = (message[1], message[2])
            elif tag == _INTERRUPT:
                raise Interrupted(f"rank {source} was interrupted")

    def _send(self, dest: int, tag: int, message: Any) -> None:
        try:
            self._sends.append(self.side.isend(message, dest=dest, tag=tag))
        except Exception:  # a rank that has left: it will not answer, which says enough
            return
        self._sends = [r for r in self._sends if not r.Test()]

    def _timed_out(self, request: Any, timeout: float) -> bool:
        """Ask every rank where it is; name those that did not arrive and abort. Returns
        True when the collective completed meanwhile (the last rank came just in time)."""
        self._answers = {}
        for other in range(self.size):
            if other != self.rank:
                self._send(other, _QUERY, self.count)
        until = time.monotonic() + _ANSWER_SECONDS
        while time.monotonic() < until and len(self._answers) < self.size - 1:
            if self._done(request):
                return True
            self._serve()
            time.sleep(0.001)
        if self._done(request):
            return True
        here = [self.rank] + [r for r, (count, _) in self._answers.items() if count == self.count]
        missing = [r for r in range(self.size) if r not in here]
        elsewhere = [f"rank {r} is at its {where}" for r, (count, where) in
                     sorted(self._answers.items()) if count != self.count]
        silent = [r for r in missing if r not in self._answers]
        self._die(
            f"cupynn.distributed: rank(s) {', '.join(map(str, missing))} of {self.size} did not "
            f"arrive at {self._where} within the timeout of {timeout:g} s; rank(s) "
            f"{', '.join(map(str, sorted(here)))} waited there. "
            + (f"{'; '.join(elsewhere)}. " if elsewhere else "")
            + (f"Rank(s) {', '.join(map(str, silent))} did not answer (busy outside cupynn's "
               f"collectives, stuck, or exited). " if silent else "")
            + f"Ending the job. A rank that is slow on purpose needs a longer timeout: "
              f"cupynn.distributed.init(timeout=...) or ${TIMEOUT_ENV} (seconds).", 1)
        return False  # not reached: _die aborts

    def tell_interrupted(self) -> None:
        for other in range(self.size):
            if other != self.rank:
                self._send(other, _INTERRUPT, self.count)

    def end_interrupted(self, code: int = 130) -> int:
        if self.is_root:
            self.abort(code)
        sys.stdout.flush()
        sys.stderr.flush()
        until = time.monotonic() + INTERRUPT_GRACE
        while time.monotonic() < until:  # the first rank's abort ends this process
            time.sleep(0.05)
        self.abort(code)
        return code

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self._critical:
            self._interrupted = True
        else:
            raise KeyboardInterrupt

    # ------------------------------------------------------------ collectives
    def _staging(self, nbytes: int) -> numpy.ndarray:
        if self._host.nbytes < nbytes:
            self._host = numpy.empty(max(nbytes, 2 * self._host.nbytes), dtype=numpy.uint8)
        return self._host[:nbytes]

    def allreduce(self, array: Any, op: str = "sum") -> Any:
        _check_op(op)
        if not array.flags.c_contiguous:
            raise ValueError("Communicator.allreduce needs a C-contiguous array.")
        self.reductions += 1
        self.reduced_bytes += int(array.nbytes)
        begin = time.perf_counter()
        self._collective("allreduce", int(array.size),
                         functools.partial(self._allreduce, array, op))
        self.reduce_seconds += time.perf_counter() - begin
        return array

    def _allreduce(self, array: Any, op: str) -> None:
        mpi_op = self.MPI.SUM if op == "sum" else self.MPI.MAX
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

    def bcast(self, obj: Any, root: int = 0) -> Any:
        return self._collective("bcast", 0, lambda: self.comm.bcast(obj, root=root))

    def allgather(self, obj: Any) -> list[Any]:
        return self._collective("allgather", 0, lambda: self.comm.allgather(obj))

    def allgather_array(self, array: Any) -> numpy.ndarray:
        from .backend import to_numpy

        local = numpy.ascontiguousarray(to_numpy(array)).reshape(-1)
        counts, dtypes = zip(*self.allgather((int(local.shape[0]), local.dtype.str)))
        if len(set(dtypes)) != 1:
            raise ValueError(f"allgather_array: the ranks' arrays have different dtypes "
                             f"{set(dtypes)}.")
        out = numpy.empty(sum(counts), dtype=local.dtype)
        self._collective("allgather_array", 0,
                         lambda: self.comm.Allgatherv(local, [out, list(counts)]))
        return out

    def barrier(self, timeout: float | None = None) -> None:
        self._collective("barrier", 0, self.comm.Barrier, timeout)

    def abort(self, code: int = 1) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        time.sleep(_FORWARD_SECONDS)  # let the launcher read this rank's last words
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


def init(*, force_mpi: bool = False, timeout: float | None = None) -> Communicator:
    """The communicator of this process (made once, then returned again).

    MPI's world communicator when an MPI launcher started the process (or with
    ``force_mpi``), else a one-rank :class:`SingleProcess`, without importing
    mpi4py. Every rank calls it, first thing (it is collective).

    With several ranks it also installs, so that any failure ends the whole
    job at once instead of leaving the other ranks waiting:

    - an excepthook: an exception that nothing catches, anywhere in the
      program, prints ``[rank r of R] <traceback>`` and aborts every rank
      (status 1; 130 for a ``KeyboardInterrupt``);
    - a Ctrl-C handler: ``KeyboardInterrupt`` as usual, but never inside a
      collective that every rank has entered (it is raised as the collective
      ends), so that no rank is left alone in it.

    Parameters
    ----------
    timeout : float > 0, optional
        Seconds a rank waits at a collective for the others before it names
        the ranks that did not arrive and aborts the job (``math.inf``: no
        limit). Default: ``$CUPYNN_MPI_TIMEOUT``, else :data:`DEFAULT_TIMEOUT`
        (10 minutes). Given again later, it replaces the communicator's.

    Raises
    ------
    ImportError
        When launched by MPI but mpi4py cannot be imported (the message says
        what to install).
    ValueError
        When ``timeout`` (or ``$CUPYNN_MPI_TIMEOUT``) is not a number > 0.
    """
    if timeout is not None:
        timeout = _check_timeout(timeout, "The 'timeout' parameter of init")
    if _WORLD:
        if timeout is not None:
            _WORLD[0].timeout = timeout
        return _WORLD[0]
    if timeout is None:
        text = os.environ.get(TIMEOUT_ENV, "").strip()
        timeout = (_check_timeout(text, f"${TIMEOUT_ENV}") if text else DEFAULT_TIMEOUT)
    if not (force_mpi or launched_by_mpi()):
        _WORLD.append(SingleProcess())
        _WORLD[0].timeout = timeout
        return _WORLD[0]
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise ImportError(f"This process was started by an MPI launcher, but mpi4py cannot be "
                          f"imported ({exc}). {_HINT}.") from None
    if MPI.COMM_WORLD.Get_size() == 1:
        _WORLD.append(SingleProcess())
        _WORLD[0].timeout = timeout
        return _WORLD[0]
    world = MPICommunicator(MPI, timeout=timeout)
    _install_handlers(world)
    _WORLD.append(world)
    return world


def _check_timeout(value: Any, what: str) -> float:
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = math.nan
    if isinstance(value, bool) or not seconds > 0:  # NaN fails too
        raise ValueError(f"{what} must be a number of seconds > 0 (math.inf: no limit). "
                         f"Got {value!r} instead.")
    return seconds


def _install_handlers(world: MPICommunicator) -> None:
    """The excepthook and the Ctrl-C handler of :func:`init` (a user's own are kept: the
    excepthook calls it before aborting; a Ctrl-C handler of the user's stays in place)."""
    previous = sys.excepthook

    def excepthook(kind: type[BaseException], value: BaseException, tb: Any) -> None:
        code = 130 if issubclass(kind, KeyboardInterrupt) else 1
        if previous is sys.__excepthook__:
            text = "".join(traceback.format_exception(kind, value, tb)).rstrip()
        else:
            previous(kind, value, tb)
            text = ""
        world._die(text, code)

    sys.excepthook = excepthook
    import threading

    if (threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGINT) is signal.default_int_handler):
        signal.signal(signal.SIGINT, world._on_sigint)


def as_communicator(comm: Any, owner: str = "fit") -> Communicator:
    """``None`` as the one-rank communicator; a Communicator as it is; else an error."""
    if comm is None:
        return SingleProcess()
    if not isinstance(comm, Communicator):
        raise TypeError(f"The 'comm' parameter of {owner} must be a cupynn.distributed."
                        f"Communicator (from cupynn.distributed.init()). Got "
                        f"{type(comm).__name__} instead.")
    return comm
