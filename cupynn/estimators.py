"""scikit-learn estimators: sparse MLPs trained with dynamic sparse training.

Why this file is long: it is one base class, whose ``fit`` (validation split, warm
start, stopping, sample weights) calls four hooks, and the two estimators that fill
them in (under 90 lines each); this doc, the only description of their parameters,
covers all three. Apart, each part would be read only with the other.

:class:`SparseMLPClassifier` and :class:`SparseMLPRegressor` follow
``sklearn.neural_network.MLPClassifier`` / ``MLPRegressor``: the same names
for the settings that mean the same (``hidden_layer_sizes``, ``max_iter`` in
epochs, ``batch_size``, ``learning_rate_init``, ``beta_1``, ``beta_2``,
``epsilon``, ``tol``, ``n_iter_no_change``, ``early_stopping``,
``validation_fraction``, ``random_state``, ``warm_start``, ``verbose``), the
same methods and fitted attributes (``classes_``, ``n_features_in_``,
``feature_names_in_``, ``loss_curve_``, ``n_iter_``, ``best_loss_``,
``validation_scores_``, ``best_validation_score_``), and they pass
scikit-learn's estimator checks. Underneath is :func:`cupynn.fit`: every hidden
and output layer is a truly sparse :class:`cupynn.SparseLinear` (``density``),
rewired after every ``redistribute_every`` epochs by ``redistribution`` (one
of the paper's seven or a composition such as ``"set+momentum"``).

``init`` defaults to ``"fan_in"`` (He-uniform), not the paper's U(-1/k, 1/k)
that :class:`cupynn.MLP` and the paper's scripts keep: at equal epochs it
scored higher on KMNIST, sparse and dense alike (20 epochs, 8 000 training
images, 3 seeds: density 0.1 0.846 against 0.832, dense 0.890 against 0.855,
``MLPClassifier`` 0.893; ``benchmarks/bench_estimators.py``,
``docs/estimators/kmnist-init.json``).

Note: ``alpha`` here is the fraction of the active weights the first
redistribution moves (the paper's α₀, as in :func:`cupynn.fit`), not
``MLPClassifier``'s L2 penalty, which these estimators do not have.

Training stops, like ``MLPClassifier``'s, when the training loss (or, with
``early_stopping``, the validation score) has not improved by ``tol`` for
``n_iter_no_change`` epochs; otherwise after ``max_iter`` epochs, with a
``ConvergenceWarning`` that names what was still improving. With
``early_stopping`` the best epoch's weights are kept. The schedule of
redistribution is that of a ``max_iter``-epoch run.

``fit(X, y, sample_weight=...)`` weights the loss as ``MLPClassifier`` does:
each mini-batch's loss is ``sum w_i l_i / sum w_i`` (a weight of 2 counts a
sample twice, 0 removes it), the gradients that growth reads are weighted
alike, and with ``early_stopping`` the validation score is the weighted one.

``warm_start``: a second ``fit`` continues the fitted network with the current
``learning_rate_init``, ``beta_1``, ``beta_2``, ``epsilon`` and
``redistribution`` (Adam's moments are kept). A changed ``hidden_layer_sizes``,
``density``, ``activation``, ``dtype`` or ``device`` cannot continue it: ``fit``
then warns and fits a new network (``partial_fit`` refuses). ``device`` counts as
the backend it resolves to: ``"auto"`` on a machine without a GPU is ``"cpu"``.

``partial_fit(X, y, sample_weight=None, classes=None)`` takes its arguments in
``MLPClassifier.partial_fit``'s order: ``classes`` is the 4th, so pass it by name.
"""

from __future__ import annotations

import numbers
import warnings
from typing import Any

import numpy
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.multiclass import check_classification_targets, unique_labels
from sklearn.utils.validation import (_check_sample_weight, check_is_fitted, column_or_1d,
                                      validate_data)

from .redistribution import NAMES, compositions, naming_rule

BATCH_AUTO = 200  # "auto": min(200, n_samples), as MLPClassifier
# What a fitted network is made of: a warm start cannot continue one built with other values.
STRUCTURE = ("hidden_layer_sizes", "density", "activation", "dtype", "device")


class _RedistributionNames(StrOptions):
    """Every preset and composition name; an error says the rule, not the dozens of names."""

    def __init__(self) -> None:
        super().__init__(set(NAMES) | set(compositions()))

    def __str__(self) -> str:
        return f"a str among the redistribution names ({naming_rule().rstrip('.')})"


class _SparseMLP(BaseEstimator):
    """What the classifier and the regressor share (see the module doc)."""

    _loss = ""
    _parameter_constraints: dict = {
        "hidden_layer_sizes": ["array-like", Interval(numbers.Integral, 1, None, closed="left")],
        "density": [Interval(numbers.Real, 0, 1, closed="right")],
        "redistribution": [_RedistributionNames(), None],
        "alpha": [Interval(numbers.Real, 0, 1, closed="both")],
        "redistribute_every": [Interval(numbers.Integral, 1, None, closed="left")],
        "end_fraction": [Interval(numbers.Real, 0, 1, closed="both")],
        "activation": [StrOptions({"relu", "sigmoid"})],
        "init": [StrOptions({"paper", "fan_in"})],
        "max_iter": [Interval(numbers.Integral, 1, None, closed="left")],
        "batch_size": [StrOptions({"auto"}), Interval(numbers.Integral, 1, None, closed="left")],
        "learning_rate_init": [Interval(numbers.Real, 0, None, closed="neither")],
        "beta_1": [Interval(numbers.Real, 0, 1, closed="left")],
        "beta_2": [Interval(numbers.Real, 0, 1, closed="left")],
        "epsilon": [Interval(numbers.Real, 0, None, closed="neither")],
        "tol": [Interval(numbers.Real, 0, None, closed="left")],
        "n_iter_no_change": [Interval(numbers.Integral, 1, None, closed="left")],
        "early_stopping": ["boolean"],
        "validation_fraction": [Interval(numbers.Real, 0, 1, closed="neither")],
        "random_state": ["random_state"],
        "warm_start": ["boolean"],
        "device": [StrOptions({"auto", "cpu", "gpu"})],
        "dtype": [StrOptions({"float32", "float64"})],
        "verbose": ["verbose"],
    }

    def __init__(self, hidden_layer_sizes: Any = (256, 256), *, density: float = 0.1,
                 redistribution: str | None = "gradient-global", alpha: float = 0.5,
                 redistribute_every: int = 1, end_fraction: float = 0.75,
                 activation: str = "relu", init: str = "fan_in", max_iter: int = 200,
                 batch_size: Any = "auto", learning_rate_init: float = 1e-3,
                 beta_1: float = 0.9, beta_2: float = 0.999, epsilon: float = 1e-8,
                 tol: float = 1e-4, n_iter_no_change: int = 10, early_stopping: bool = False,
                 validation_fraction: float = 0.1, random_state: Any = None,
                 warm_start: bool = False, device: str = "auto", dtype: str = "float32",
                 verbose: Any = False) -> None:
        self.hidden_layer_sizes = hidden_layer_sizes
        self.density = density
        self.redistribution = redistribution
        self.alpha = alpha
        self.redistribute_every = redistribute_every
        self.end_fraction = end_fraction
        self.activation = activation
        self.init = init
        self.max_iter = max_iter
        self.batch_size = batch_size
        self.learning_rate_init = learning_rate_init
        self.beta_1 = beta_1
        self.beta_2 = beta_2
        self.epsilon = epsilon
        self.tol = tol
        self.n_iter_no_change = n_iter_no_change
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.random_state = random_state
        self.warm_start = warm_start
        self.device = device
        self.dtype = dtype
        self.verbose = verbose

    # ---------------------------------------------------------------- hooks
    def _targets(self, y: numpy.ndarray, first: bool, classes: Any = None) -> numpy.ndarray:
        raise NotImplementedError  # pragma: no cover

    def _n_outputs(self) -> int:
        raise NotImplementedError  # pragma: no cover

    def _validation_score(self, metrics: dict[str, Any]) -> float:
        raise NotImplementedError  # pragma: no cover

    def _weighted_score(self, x: numpy.ndarray, targets: numpy.ndarray,
                        weight: numpy.ndarray) -> float:
        raise NotImplementedError  # pragma: no cover

    # ---------------------------------------------------------------- fitting
    def fit(self, X: Any, y: Any, sample_weight: Any = None) -> "_SparseMLP":
        """Train on ``X`` (n_samples, n_features) and ``y``; returns self.

        ``sample_weight`` (n_samples,), optional: non-negative weights of the
        samples in the loss (see the module doc). A new model each call, unless
        ``warm_start`` and already fitted (and of the same structure)."""
        self._validate_params()
        return self._fit(X, y, incremental=False, sample_weight=sample_weight)

    def _hidden_sizes(self) -> list[int]:
        sizes = ([self.hidden_layer_sizes] if isinstance(self.hidden_layer_sizes, numbers.Integral)
                 else list(self.hidden_layer_sizes))
        if any(isinstance(h, bool) or not isinstance(h, numbers.Integral) or h < 1
               for h in sizes):
            raise ValueError(f"The 'hidden_layer_sizes' parameter of {type(self).__name__} must "
                             f"hold positive ints. Got {self.hidden_layer_sizes!r} instead.")
        return [int(h) for h in sizes]

    def _build(self, n_features: int, seed: int) -> None:
        import cupynn
        from .redistribution import create

        sizes = [n_features, *self._hidden_sizes(), self._n_outputs()]
        self.model_ = cupynn.MLP(sizes, density=self.density, seed=seed, dtype=self.dtype,
                                 device=self.device, init=self.init, activation=self.activation)
        self.optimizer_ = cupynn.Adam(self.model_, lr=self.learning_rate_init,
                                      betas=(self.beta_1, self.beta_2), eps=self.epsilon)
        self.redistributor_ = (None if self.redistribution is None
                               else create(self.redistribution, seed=seed))
        self._built_with = {name: getattr(self, name) for name in (*STRUCTURE, "redistribution")}
        self._built_with["hidden_layer_sizes"] = self._hidden_sizes()
        self.seed_ = seed
        self.n_iter_ = 0
        self.loss_curve_: list[float] = []
        self.best_loss_ = numpy.inf
        self.validation_scores_: list[float] | None = [] if self.early_stopping else None
        self.best_validation_score_ = -numpy.inf if self.early_stopping else None
        self._no_improvement = 0
        self._shuffle_state: Any = None

    def _changed_structure(self) -> dict[str, tuple[Any, Any]]:
        """The parameters of :data:`STRUCTURE` that differ from the fitted network's:
        name -> (built with, now)."""
        built = getattr(self, "_built_with", None)
        if built is None:  # pickled before the estimators recorded it
            return {}
        now = {name: getattr(self, name) for name in STRUCTURE}
        now["hidden_layer_sizes"] = self._hidden_sizes()
        changed = {name: (built[name], now[name]) for name in STRUCTURE
                   if name != "device" and built[name] != now[name]}
        # The device as the network runs on it: 'auto' that resolved to the CPU is 'cpu'.
        running = self.model_.backend.name
        wanted = _resolved_device(self.device)
        if wanted != running:
            was = built["device"]
            changed["device"] = (was if was == running else _Text(f"{was!r} ({running})"),
                                 self.device if self.device == wanted
                                 else _Text(f"{self.device!r} ({wanted})"))
        return {name: changed[name] for name in STRUCTURE if name in changed}

    def _continue(self, incremental: bool) -> bool:
        """Whether this call continues the fitted network; on a warm start whose structure
        changed, warns that a new one is fitted (partial_fit refuses)."""
        if not ((incremental or self.warm_start) and hasattr(self, "model_")):
            return False
        changed = self._changed_structure()
        if not changed:
            return True
        what = "; ".join(f"{name} {_shown(old)} -> {_shown(new)}"
                         for name, (old, new) in changed.items())
        if incremental:
            raise ValueError(f"partial_fit continues the fitted network, which was built with "
                             f"other parameters ({what}); call fit to start a new one.")
        warnings.warn(f"{type(self).__name__}: warm_start cannot continue a network built with "
                      f"other parameters ({what}); fitting a new one.", UserWarning)
        return False

    def _apply_settings(self) -> None:
        """A continued fit uses the current optimizer settings and redistribution (as
        MLPClassifier's warm start uses its learning_rate_init); Adam keeps its moments."""
        import cupynn
        from .redistribution import create

        settings = (self.learning_rate_init, (self.beta_1, self.beta_2), self.epsilon)
        opt = self.optimizer_
        if (opt.lr, tuple(opt.betas), opt.eps) != settings:
            fresh = cupynn.Adam(self.model_, lr=settings[0], betas=settings[1],
                                eps=settings[2])  # checks them (eps representable, say)
            fresh.t, fresh.state = opt.t, opt.state
            self.optimizer_ = fresh
        built = getattr(self, "_built_with", None)
        if built is not None and built["redistribution"] != self.redistribution:
            self.redistributor_ = (None if self.redistribution is None
                                   else create(self.redistribution, seed=self.seed_))
            built["redistribution"] = self.redistribution
        if self.early_stopping and self.validation_scores_ is None:  # switched on
            self.validation_scores_, self.best_validation_score_ = [], -numpy.inf

    def _fit(self, X: Any, y: Any, incremental: bool, classes: Any = None,
             sample_weight: Any = None) -> "_SparseMLP":
        from .training import Trainer

        first = not self._continue(incremental)
        X, y = validate_data(self, X, y, reset=first, accept_sparse=False,
                             dtype=[numpy.float64, numpy.float32],
                             multi_output=isinstance(self, RegressorMixin), y_numeric=False)
        if sample_weight is not None:  # scikit-learn's checks and messages
            sample_weight = _check_sample_weight(sample_weight, X, dtype=numpy.float64,
                                                 ensure_non_negative=True)
        targets = self._targets(y, first, classes)
        seed = (int(check_random_state(self.random_state).randint(0, 2**31 - 1)) if first
                else self.seed_)
        x_train, y_train, w_train, test, w_val = X, targets, sample_weight, None, None
        # The validation split and its checks come first: a refusal leaves a fitted network
        # (warm_start) as it was.
        if self.early_stopping and not incremental:
            from sklearn.model_selection import train_test_split

            stratify = targets if isinstance(self, ClassifierMixin) else None
            arrays = (X, targets) if sample_weight is None else (X, targets, sample_weight)
            try:
                parts = train_test_split(*arrays, test_size=self.validation_fraction,
                                         random_state=seed, stratify=stratify)
            except ValueError as exc:
                raise ValueError(f"early_stopping could not hold out validation_fraction="
                                 f"{self.validation_fraction} of {X.shape[0]} samples "
                                 f"({exc}).") from None
            x_train, x_val, y_train, y_val = parts[:4]
            if sample_weight is None:
                test = (x_val, y_val)
            else:  # the weighted validation score is computed here, not by the trainer
                w_train, w_val = parts[4:]
                if not w_train.any():
                    raise ValueError(f"early_stopping held out every sample of non-zero weight "
                                     f"(validation_fraction={self.validation_fraction}); no "
                                     f"weight is left to train on.")
                if not w_val.any():
                    raise ValueError(f"early_stopping's validation split (validation_fraction="
                                     f"{self.validation_fraction}) holds no sample of non-zero "
                                     f"weight, so there is no validation score to stop on; "
                                     f"give more samples a non-zero weight, change "
                                     f"validation_fraction or random_state, or fit without "
                                     f"early_stopping.")
        if first:
            self._build(X.shape[1], seed)
        else:
            self._apply_settings()
        batch = (min(BATCH_AUTO, x_train.shape[0]) if self.batch_size == "auto"
                 else min(int(self.batch_size), x_train.shape[0]))
        trainer = Trainer(self.model_, self.optimizer_, (x_train, y_train), test,
                          epochs=self.max_iter, batch_size=batch,
                          loss=self._loss, seed=self.seed_, progress=bool(self.verbose)
                          and int(self.verbose) > 1, redistribution=self.redistributor_,
                          alpha=self.alpha, redistribute_every=self.redistribute_every,
                          end_fraction=self.end_fraction, sample_weight=w_train)
        if self._shuffle_state is not None:
            trainer.rng.bit_generator.state = self._shuffle_state
        best_state = None
        epochs = 1 if incremental else self.max_iter
        converged = False
        for epoch in range(self.n_iter_ + 1, self.n_iter_ + epochs + 1):
            metrics = trainer.train_epoch(epoch)
            self.n_iter_ = epoch
            loss = float(metrics["train_loss"])
            self.loss_curve_.append(loss)
            if self.early_stopping and not incremental:
                score = (self._validation_score(metrics) if w_val is None
                         else self._weighted_score(x_val, y_val, w_val))
                self.validation_scores_.append(score)
                if self.verbose:
                    print(f"Iteration {epoch}, loss = {loss:.8f}, validation score = {score:.6f}")
                if score > self.best_validation_score_ + self.tol:
                    self._no_improvement = 0
                else:
                    self._no_improvement += 1
                if score > self.best_validation_score_:
                    self.best_validation_score_ = score
                    best_state = self.model_.state_dict()
            else:
                if self.verbose:
                    print(f"Iteration {epoch}, loss = {loss:.8f}")
                self._no_improvement = (self._no_improvement + 1
                                        if loss > self.best_loss_ - self.tol else 0)
            self.best_loss_ = min(self.best_loss_, loss)
            if not incremental and self._no_improvement >= self.n_iter_no_change:
                converged = True
                if self.verbose:
                    print(f"Stopping: no improvement of more than tol={self.tol} for "
                          f"{self.n_iter_no_change} epochs.")
                break
        self._shuffle_state = trainer.rng.bit_generator.state
        if best_state is not None:
            self.model_.load_state_dict(best_state)
            self.optimizer_ = _fresh_moments(self.optimizer_)
        if self.redistributor_ is not None:  # free per-epoch state (WoodFisher's blocks)
            self.redistributor_.start_epoch(self.model_, 1, False)
        self.model_.clear_cache()
        if not incremental and not converged:
            watched = "validation score" if self.early_stopping else "training loss"
            warnings.warn(f"{type(self).__name__}: the {watched} was still improving after "
                          f"max_iter={self.max_iter} epochs; raise max_iter to train longer.",
                          ConvergenceWarning)
        return self

    def _logits(self, X: Any) -> numpy.ndarray:
        check_is_fitted(self, "model_")
        X = validate_data(self, X, reset=False, accept_sparse=False,
                          dtype=[numpy.float64, numpy.float32])
        return self.model_.predict(X, batch_size=4096).astype(numpy.float64)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = False
        tags.input_tags.allow_nan = False
        return tags

    @classmethod
    def _expected_failed_checks(cls) -> dict[str, str]:
        """scikit-learn estimator checks that cannot pass on the defaults, with the reason."""
        return {"check_sample_weight_equivalence_on_dense_data": (
            "in float32, the default dtype, weighted samples and repeated ones round "
            "differently, and up to 200 epochs of Adam carry that past the check's rtol=1e-7; "
            "in float64 the check passes (differences 1e-16), see tests/test_estimators.py::"
            "test_scikit_learns_sample_weight_check_passes_in_float64")}


class _Text(str):
    """A value already written for a message (shown as is, not repr'd)."""


def _shown(value: Any) -> str:
    return str(value) if isinstance(value, _Text) else repr(value)


def _resolved_device(device: str) -> str:
    """The backend ``device`` gives here ("cpu" or "gpu"); the name itself where it cannot be
    resolved (device='gpu' without a GPU: building the network then says why)."""
    from .backend import get_backend

    try:
        return get_backend(device).name
    except (RuntimeError, ValueError):
        return device


def _fresh_moments(optimizer: Any) -> Any:
    """Adam for restored weights whose moments belong to other epochs: started again,
    keeping its step count and settings."""
    import cupynn

    fresh = cupynn.Adam(optimizer.model, lr=optimizer.lr, betas=optimizer.betas,
                        eps=optimizer.eps)
    fresh.t = optimizer.t
    return fresh


class SparseMLPClassifier(ClassifierMixin, _SparseMLP):
    """A truly sparse MLP classifier (softmax output, cross-entropy), scikit-learn style.

    Parameters are those of the module doc (shared with :class:`SparseMLPRegressor`).

    Attributes
    ----------
    classes_ : (n_classes,) array of the labels seen (any label type: strings too)
    n_features_in_, feature_names_in_ : as scikit-learn sets them
    model_ : cupynn.MLP, ``n_features -> *hidden_layer_sizes -> n_classes``
    loss_curve_ : list of the mean training loss of each epoch
    n_iter_ : int, epochs run
    """

    _loss = "cross_entropy"

    def _targets(self, y, first, classes=None):
        check_classification_targets(y)
        if first:
            labels = unique_labels(y) if classes is None else unique_labels(classes)
            if len(labels) < 2:
                raise ValueError(f"{type(self).__name__} needs samples of at least 2 classes. "
                                 f"Got 1 class ({labels[0]!r}).")
            self.classes_ = labels
        elif classes is not None and not numpy.array_equal(unique_labels(classes), self.classes_):
            raise ValueError(f"partial_fit's classes {unique_labels(classes)!r} differ from the "
                             f"first call's {self.classes_!r}.")
        unseen = numpy.setdiff1d(y, self.classes_)
        if len(unseen):
            raise ValueError(f"y holds labels {unseen[:5]!r} that are not among the classes "
                             f"{self.classes_!r}.")
        return numpy.searchsorted(self.classes_, y).astype(numpy.int64)

    def _n_outputs(self) -> int:
        return len(self.classes_)

    def _validation_score(self, metrics):
        return float(metrics["test_accuracy"])

    def _weighted_score(self, x, targets, weight):
        from sklearn.metrics import accuracy_score

        best = self.model_.predict(x, batch_size=4096).argmax(axis=1)
        return float(accuracy_score(targets, best, sample_weight=weight))

    def partial_fit(self, X: Any, y: Any, sample_weight: Any = None,
                    classes: Any = None) -> "SparseMLPClassifier":
        """One epoch on ``X``, ``y`` (weighted by ``sample_weight``, optional); the first
        call needs ``classes`` (all labels). Returns self. The arguments are in
        ``MLPClassifier.partial_fit``'s order."""
        if not hasattr(self, "model_"):
            self._validate_params()
            if classes is None:
                hint = ("" if sample_weight is None else
                        "; classes is the 4th argument, as in MLPClassifier: pass classes=... "
                        "(the 3rd is sample_weight)")
                raise ValueError(f"The first call of partial_fit needs classes= (every label "
                                 f"there will be){hint}.")
        return self._fit(X, y, incremental=True, classes=classes, sample_weight=sample_weight)

    def decision_function(self, X: Any) -> numpy.ndarray:
        """Logits (n_samples, n_classes); for two classes, logit(1) - logit(0), (n_samples,)."""
        logits = self._logits(X)
        return logits[:, 1] - logits[:, 0] if logits.shape[1] == 2 else logits

    def predict_proba(self, X: Any) -> numpy.ndarray:
        """Softmax probabilities (n_samples, n_classes), in float64."""
        logits = self._logits(X)
        logits -= logits.max(axis=1, keepdims=True)
        p = numpy.exp(logits)
        return p / p.sum(axis=1, keepdims=True)

    def predict_log_proba(self, X: Any) -> numpy.ndarray:
        return numpy.log(self.predict_proba(X))

    def predict(self, X: Any) -> numpy.ndarray:
        """The most probable class of each sample."""
        best = self._logits(X).argmax(axis=1)  # first: it says when not fitted
        return self.classes_[best]

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_label = False
        return tags


class SparseMLPRegressor(RegressorMixin, _SparseMLP):
    """A truly sparse MLP regressor (linear output, mean squared error), scikit-learn style.

    ``y`` may be (n_samples,) or (n_samples, n_outputs) of numbers; a column
    (n_samples, 1) is taken as (n_samples,), with scikit-learn's
    ``DataConversionWarning``, and predicted (n_samples,), as ``MLPRegressor``
    does. Parameters and attributes as :class:`SparseMLPClassifier` (without
    ``classes_``).
    """

    _loss = "mean_squared_error"

    def _targets(self, y, first, classes=None):
        y = numpy.asarray(y)
        if y.dtype.kind in "OUS":  # object arrays of numbers are converted, as scikit-learn does
            try:
                y = y.astype(numpy.float64) if y.dtype.kind == "O" else None
            except (TypeError, ValueError):
                y = None
            if y is None:
                raise ValueError(f"{type(self).__name__} fits numeric targets, but y holds "
                                 f"strings. To predict labels, use SparseMLPClassifier; "
                                 f"otherwise convert y to numbers.")
        y = y.astype(numpy.float64, copy=False)
        if y.ndim == 2 and y.shape[1] == 1:  # as MLPRegressor: a 1-d target, predicted (n,)
            y = column_or_1d(y, warn=True)
        if first:
            self._y_1d = y.ndim == 1
            self.n_outputs_ = 1 if y.ndim == 1 else y.shape[1]
        elif (1 if y.ndim == 1 else y.shape[1]) != self.n_outputs_:
            raise ValueError(f"y has {1 if y.ndim == 1 else y.shape[1]} outputs, but "
                             f"{type(self).__name__} was fitted with {self.n_outputs_}.")
        return y if y.ndim == 1 or y.shape[1] > 1 else y[:, 0]

    def _n_outputs(self) -> int:
        return self.n_outputs_

    def _validation_score(self, metrics):
        return float(metrics["test_r2"])

    def _weighted_score(self, x, targets, weight):
        from sklearn.metrics import r2_score

        pred = self.model_.predict(x, batch_size=4096).astype(numpy.float64)
        return float(r2_score(targets, pred[:, 0] if targets.ndim == 1 else pred,
                              sample_weight=weight))

    def partial_fit(self, X: Any, y: Any, sample_weight: Any = None) -> "SparseMLPRegressor":
        """One epoch on ``X``, ``y`` (weighted by ``sample_weight``, optional); returns self."""
        if not hasattr(self, "model_"):
            self._validate_params()
        return self._fit(X, y, incremental=True, sample_weight=sample_weight)

    def predict(self, X: Any) -> numpy.ndarray:
        """Predictions (n_samples,) or (n_samples, n_outputs), as ``y`` was."""
        out = self._logits(X)
        return out[:, 0] if self._y_1d else out

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        tags.target_tags.single_output = True
        return tags
