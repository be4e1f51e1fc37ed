"""The scikit-learn estimators: scikit-learn's own checks, and behaviour in its world."""

from __future__ import annotations

import pickle

import numpy
import pytest
import scipy.sparse
from sklearn.base import clone
from sklearn.datasets import load_digits, make_regression
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import GridSearchCV, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import parametrize_with_checks

import cupynn
from cupynn.estimators import SparseMLPClassifier, SparseMLPRegressor


@parametrize_with_checks([SparseMLPClassifier(), SparseMLPRegressor()],
                         expected_failed_checks=lambda e: e._expected_failed_checks())
def test_scikit_learn_estimator_checks(estimator, check):
    """Every check, on the default settings (the paper's 256-wide layers at density 0.1)."""
    check(estimator)


def test_only_the_float32_sample_weight_equivalence_is_excused():
    for cls in (SparseMLPClassifier, SparseMLPRegressor):
        assert list(cls._expected_failed_checks()) == [
            "check_sample_weight_equivalence_on_dense_data"]


@pytest.mark.parametrize("cls", [SparseMLPClassifier, SparseMLPRegressor])
def test_scikit_learns_sample_weight_check_passes_in_float64(cls):
    """scikit-learn's own check that weight k means the sample k times (0: removed), on the
    default settings but float64, where rounding cannot carry the two fits apart."""
    from sklearn.utils.estimator_checks import check_sample_weight_equivalence_on_dense_data

    check_sample_weight_equivalence_on_dense_data(cls.__name__, cls(dtype="float64"))


SMALL = dict(hidden_layer_sizes=(32,), density=0.3, max_iter=30, learning_rate_init=1e-2,
             random_state=0)


@pytest.fixture(scope="module")
def digits():
    x, y = load_digits(return_X_y=True)
    return (x / 16.0)[:600], y[:600]


def test_top_level_names():
    assert cupynn.SparseMLPClassifier is SparseMLPClassifier
    assert cupynn.SparseMLPRegressor is SparseMLPRegressor


def test_string_labels_and_probabilities(digits):
    x, y = digits
    names = numpy.array(["zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
                         "nine"])[y]
    clf = SparseMLPClassifier(**SMALL).fit(x, names)
    assert list(clf.classes_) == sorted(set(names))
    assert clf.predict(x[:5]).dtype.kind == "U" and clf.score(x, names) > 0.9
    proba = clf.predict_proba(x[:20])
    numpy.testing.assert_allclose(proba.sum(axis=1), 1, rtol=1e-12)
    assert (clf.classes_[proba.argmax(axis=1)] == clf.predict(x[:20])).all()
    assert clf.decision_function(x[:20]).shape == (20, 10)
    assert clf.n_features_in_ == 64 and len(clf.loss_curve_) == clf.n_iter_ <= 30


def test_binary_decision_function_orders_like_the_probability(digits):
    x, y = digits
    keep = y < 2
    clf = SparseMLPClassifier(**SMALL).fit(x[keep], numpy.where(y[keep] == 1, "yes", "no"))
    decision = clf.decision_function(x[keep])
    assert decision.shape == (keep.sum(),)
    assert (numpy.argsort(decision, kind="stable")
            == numpy.argsort(clf.predict_proba(x[keep])[:, 1], kind="stable")).all()


def test_random_state_reproduces_and_differs(digits):
    x, y = digits
    a = SparseMLPClassifier(**SMALL).fit(x, y).predict_proba(x)
    b = SparseMLPClassifier(**SMALL).fit(x, y).predict_proba(x)
    c = SparseMLPClassifier(**dict(SMALL, random_state=1)).fit(x, y).predict_proba(x)
    numpy.testing.assert_array_equal(a, b)
    assert not numpy.array_equal(a, c)


def test_partial_fit_needs_classes_then_learns(digits):
    x, y = digits
    clf = SparseMLPClassifier(**SMALL)
    with pytest.raises(ValueError, match="first call of partial_fit needs classes="):
        clf.partial_fit(x[:100], y[:100])
    for epoch in range(6):
        clf.partial_fit(x[:300], y[:300], classes=numpy.arange(10))
    assert clf.n_iter_ == 6 and len(clf.loss_curve_) == 6
    assert clf.loss_curve_[-1] < clf.loss_curve_[0]
    with pytest.raises(ValueError, match="differ from the first call's"):
        clf.partial_fit(x[:10], y[:10], classes=numpy.arange(11))
    with pytest.raises(ValueError, match="X has 63 features, but SparseMLPClassifier is "
                                         "expecting 64 features"):
        clf.partial_fit(x[:10, :63], y[:10])


def test_early_stopping_stops_and_keeps_the_best(digits):
    x, y = digits
    clf = SparseMLPClassifier(**dict(SMALL, max_iter=200, early_stopping=True,
                                     n_iter_no_change=3, validation_fraction=0.2))
    clf.fit(x, y)
    assert clf.n_iter_ < 200 and len(clf.validation_scores_) == clf.n_iter_
    assert clf.best_validation_score_ == max(clf.validation_scores_)
    best = int(numpy.argmax(clf.validation_scores_))
    assert clf.n_iter_ - 1 - best >= 3  # stopped after 3 epochs without improvement


def test_max_iter_without_convergence_warns(digits):
    x, y = digits
    with pytest.warns(ConvergenceWarning, match="still improving after max_iter=2"):
        SparseMLPClassifier(**dict(SMALL, max_iter=2)).fit(x, y)


def test_warm_start_continues(digits):
    x, y = digits
    clf = SparseMLPClassifier(**dict(SMALL, max_iter=5, warm_start=True, tol=0))
    with pytest.warns(ConvergenceWarning):
        clf.fit(x, y)
    first = clf.model_
    with pytest.warns(ConvergenceWarning):
        clf.fit(x, y)
    assert clf.model_ is first and clf.n_iter_ == 10 and len(clf.loss_curve_) == 10


def test_regressor_single_and_multi_output():
    x, y = make_regression(n_samples=300, n_features=8, n_targets=3, noise=1.0, random_state=0)
    y = StandardScaler().fit_transform(y)
    reg = SparseMLPRegressor(hidden_layer_sizes=(64,), density=0.5, max_iter=150,
                             random_state=0, learning_rate_init=1e-2)
    assert reg.fit(x, y).predict(x).shape == (300, 3) and reg.score(x, y) > 0.9
    assert reg.fit(x, y[:, 0]).predict(x).shape == (300,)
    assert reg.score(x, y[:, 0]) > 0.9


def test_in_a_pipeline_grid_search_and_cross_validation(digits):
    x, y = digits
    pipe = make_pipeline(StandardScaler(), SparseMLPClassifier(**SMALL))
    search = GridSearchCV(pipe, {"sparsemlpclassifier__density": [0.1, 0.5]}, cv=2)
    search.fit(x, y)
    assert search.best_params_["sparsemlpclassifier__density"] in (0.1, 0.5)
    assert search.score(x, y) > 0.8
    scores = cross_val_score(SparseMLPClassifier(**SMALL), x, y, cv=3)
    assert scores.shape == (3,) and scores.min() > 0.7


def test_clone_and_pickle(digits):
    x, y = digits
    clf = SparseMLPClassifier(**SMALL).fit(x, y)
    fresh = clone(clf)
    assert fresh.get_params() == clf.get_params() and not hasattr(fresh, "model_")
    again = pickle.loads(pickle.dumps(clf))
    numpy.testing.assert_array_equal(again.predict_proba(x), clf.predict_proba(x))
    again.partial_fit(x, y)  # the optimizer came along
    assert again.n_iter_ == clf.n_iter_ + 1


def test_feature_names_from_a_dataframe(digits):
    pandas = pytest.importorskip("pandas")
    x, y = digits
    frame = pandas.DataFrame(x, columns=[f"pixel{i}" for i in range(64)])
    clf = SparseMLPClassifier(**SMALL).fit(frame, y)
    assert list(clf.feature_names_in_) == list(frame.columns)


def test_sparse_input_is_refused_with_a_clear_message(digits):
    x, y = digits
    with pytest.raises(TypeError, match="Sparse data was passed.*dense data is required"):
        SparseMLPClassifier(**SMALL).fit(scipy.sparse.csr_matrix(x), y)


@pytest.mark.parametrize("params, message", [
    (dict(density=1.5), r"The 'density' parameter of SparseMLPClassifier must be a float in the "
                        r"range \(0.0, 1.0\]. Got 1.5 instead."),
    (dict(redistribution="rigl"), "The 'redistribution' parameter of SparseMLPClassifier must "
                                  "be a str among"),
    (dict(hidden_layer_sizes=(8, 0)), "must hold positive ints"),
    (dict(batch_size=0), "The 'batch_size' parameter"),
])
def test_bad_parameters_fail_at_fit_with_their_name(digits, params, message):
    x, y = digits
    clf = SparseMLPClassifier(**params)  # construction checks nothing, as scikit-learn asks
    with pytest.raises(ValueError, match=message):
        clf.fit(x[:50], y[:50])


def test_model_file_from_an_estimator(digits, tmp_path):
    x, y = digits
    clf = SparseMLPClassifier(**SMALL).fit(x, y)
    cupynn.save(clf.model_, tmp_path / "digits.npz")
    model = cupynn.load(tmp_path / "digits.npz")
    assert (clf.classes_[model.predict(x).argmax(axis=1)] == clf.predict(x)).all()


# ---------------------------------------------------------------- issue 17 part 4
def test_warm_start_uses_a_changed_learning_rate_and_keeps_adams_moments(digits):
    """MLPClassifier's warm start trains with the current learning_rate_init; so does
    this one (the Adam moments and step count carry on)."""
    x, y = digits
    clf = SparseMLPClassifier(**dict(SMALL, max_iter=2, warm_start=True, tol=0))
    with pytest.warns(ConvergenceWarning):
        clf.fit(x, y)
    steps, moments = clf.optimizer_.t, clf.optimizer_.state
    clf.set_params(learning_rate_init=0.5, beta_1=0.5)
    with pytest.warns(ConvergenceWarning):
        clf.fit(x, y)
    assert clf.optimizer_.lr == 0.5 and clf.optimizer_.betas == (0.5, SMALL.get("beta_2", 0.999))
    assert clf.optimizer_.t == 2 * steps and clf.optimizer_.state is moments
    assert clf.n_iter_ == 4
    # The learning rate is used: lr 0.5 wrecks what lr 1e-2 learned.
    assert clf.loss_curve_[-1] > 2 * clf.loss_curve_[1]


@pytest.mark.parametrize("change, expected", [
    (dict(hidden_layer_sizes=(16,)), r"hidden_layer_sizes \[32\] -> \[16\]"),
    (dict(density=0.5), r"density 0.3 -> 0.5"),
    (dict(activation="sigmoid"), r"activation 'relu' -> 'sigmoid'"),
])
def test_warm_start_with_another_structure_warns_and_fits_a_new_network(digits, change,
                                                                         expected):
    x, y = digits
    clf = SparseMLPClassifier(**dict(SMALL, max_iter=2, warm_start=True))
    with pytest.warns(ConvergenceWarning):
        clf.fit(x, y)
    clf.set_params(**change)
    with pytest.warns(UserWarning, match="warm_start cannot continue a network built with "
                                         "other parameters \\(" + expected):
        clf.fit(x, y)
    fresh = clone(clf).set_params(warm_start=False)
    with pytest.warns(ConvergenceWarning):
        fresh.fit(x, y)
    assert clf.n_iter_ == 2 and clf.model_.config() == fresh.model_.config()
    numpy.testing.assert_array_equal(clf.predict_proba(x), fresh.predict_proba(x))
    with pytest.warns(ConvergenceWarning):  # the new network continues without a warning
        clf.fit(x, y)
    assert clf.n_iter_ == 4


def test_partial_fit_refuses_a_network_of_another_structure(digits):
    x, y = digits
    clf = SparseMLPClassifier(**SMALL).partial_fit(x, y, classes=numpy.arange(10))
    clf.set_params(density=0.5)
    with pytest.raises(ValueError, match=r"partial_fit continues the fitted network, which was "
                                         r"built with other parameters \(density 0.3 -> 0.5\)"):
        clf.partial_fit(x, y)


def test_warm_start_uses_a_changed_redistribution(digits):
    x, y = digits
    clf = SparseMLPClassifier(**dict(SMALL, max_iter=2, warm_start=True))
    with pytest.warns(ConvergenceWarning):
        clf.fit(x, y)
    clf.set_params(redistribution="set+random")
    with pytest.warns(ConvergenceWarning):
        clf.fit(x, y)
    assert clf.redistributor_.name == "set+random"


FULL_BATCH = dict(hidden_layer_sizes=(16,), density=0.5, max_iter=4, tol=0.0, batch_size=10_000,
                  learning_rate_init=1e-2, dtype="float64", random_state=0)


@pytest.mark.parametrize("cls", [SparseMLPClassifier, SparseMLPRegressor])
def test_integer_sample_weights_fit_as_repeated_samples(digits, cls):
    """scikit-learn's meaning of sample_weight: weight k is the sample k times (0: removed).
    With one batch (the whole data), in float64, fitting weighted equals fitting repeated."""
    x, y = digits
    x, y = x[:200], (y[:200] if cls is SparseMLPClassifier else y[:200] / 9.0)
    w = numpy.random.default_rng(0).integers(0, 4, len(x))
    with pytest.warns(ConvergenceWarning):
        weighted = cls(**FULL_BATCH).fit(x, y, sample_weight=w)
    with pytest.warns(ConvergenceWarning):
        repeated = cls(**FULL_BATCH).fit(x.repeat(w, axis=0), y.repeat(w))
    with pytest.warns(ConvergenceWarning):
        unweighted = cls(**FULL_BATCH).fit(x, y)
    method = "predict_proba" if cls is SparseMLPClassifier else "predict"
    out = getattr(weighted, method)(x)
    numpy.testing.assert_allclose(out, getattr(repeated, method)(x), rtol=1e-8, atol=1e-12)
    assert not numpy.allclose(out, getattr(unweighted, method)(x), rtol=1e-3)


def test_sample_weight_moves_the_decision_and_partial_fit_takes_it(digits):
    x, y = digits
    heavy = numpy.where(y == 3, 50.0, 1.0)
    plain = SparseMLPClassifier(**SMALL).fit(x, y)
    weighted = SparseMLPClassifier(**SMALL).fit(x, y, sample_weight=heavy)
    assert (weighted.predict(x) == 3).sum() > (plain.predict(x) == 3).sum()
    clf = SparseMLPClassifier(**SMALL)
    clf.partial_fit(x, y, numpy.ones(len(y)), classes=numpy.arange(10))
    clf.partial_fit(x, y, sample_weight=heavy)
    assert clf.n_iter_ == 2
    with pytest.raises(ValueError, match=r"sample_weight.shape == \(5,\), expected \(600,\)"):
        SparseMLPClassifier(**SMALL).fit(x, y, sample_weight=numpy.ones(5))
    with pytest.raises(ValueError, match="Negative values in data passed to `sample_weight`"):
        SparseMLPClassifier(**SMALL).fit(x, y, sample_weight=-heavy)


@pytest.mark.parametrize("cls", [SparseMLPClassifier, SparseMLPRegressor])
def test_early_stopping_scores_the_validation_samples_by_their_weight(digits, cls):
    """The validation score of a weighted fit is the weighted score of the held-out samples
    (MLPClassifier's: accuracy_score / r2_score with their sample_weight)."""
    from sklearn.metrics import accuracy_score, r2_score
    from sklearn.model_selection import train_test_split

    x, y = digits
    y = y if cls is SparseMLPClassifier else y / 9.0
    w = numpy.random.default_rng(1).uniform(0, 3, len(y))
    clf = cls(**dict(SMALL, max_iter=1, early_stopping=True, validation_fraction=0.3))
    with pytest.warns(ConvergenceWarning, match="the validation score was still improving"):
        clf.fit(x, y, sample_weight=w)
    stratify = y if cls is SparseMLPClassifier else None
    _, x_val, _, y_val, _, w_val = train_test_split(x, y, w, test_size=0.3,
                                                    random_state=clf.seed_, stratify=stratify)
    score = (accuracy_score if cls is SparseMLPClassifier else r2_score)(
        y_val, clf.predict(x_val), sample_weight=w_val)
    assert clf.validation_scores_ == [pytest.approx(score, rel=1e-6)]
    unweighted = (accuracy_score if cls is SparseMLPClassifier else r2_score)(
        y_val, clf.predict(x_val))
    assert score != pytest.approx(unweighted, rel=1e-6)


def test_convergence_warning_names_the_validation_score_with_early_stopping(digits):
    x, y = digits
    clf = SparseMLPClassifier(**dict(SMALL, max_iter=2, early_stopping=True))
    with pytest.warns(ConvergenceWarning, match="the validation score was still improving after "
                                                "max_iter=2"):
        clf.fit(x, y)


def test_regressor_fitted_on_a_column_predicts_one_dimension():
    """As MLPRegressor: y of shape (n, 1) warns like column_or_1d and predicts (n,)."""
    from sklearn.exceptions import DataConversionWarning

    x, y = make_regression(n_samples=100, n_features=5, random_state=0)
    reg = SparseMLPRegressor(**dict(SMALL, max_iter=3))
    with pytest.warns(DataConversionWarning, match="A column-vector y was passed"):
        reg.fit(x, y[:, None] / 100)
    assert reg.predict(x).shape == (100,) and reg.n_outputs_ == 1


@pytest.mark.parametrize("y", [numpy.array(["a", "b"] * 50), numpy.array(["1.5", "2"] * 50),
                               numpy.array(["a", 2.0] * 50, dtype=object)])
def test_regressor_refuses_string_targets_clearly(y):
    x = numpy.random.default_rng(0).standard_normal((100, 4))
    with pytest.raises(ValueError, match="SparseMLPRegressor fits numeric targets, but y holds "
                                         "strings. To predict labels, use SparseMLPClassifier"):
        SparseMLPRegressor(**SMALL).fit(x, y)


def test_regressor_takes_an_object_array_of_numbers():
    x = numpy.random.default_rng(0).standard_normal((100, 4))
    y = numpy.array([0.5, 2.0] * 50, dtype=object)
    assert SparseMLPRegressor(**dict(SMALL, max_iter=3)).fit(x, y).predict(x).shape == (100,)


def test_the_default_init_is_fan_in_as_measured(digits):
    """benchmarks/bench_estimators.py: at equal epochs fan_in beat the paper's init, sparse and
    dense (docs/estimators/kmnist-init.json); cupynn.MLP and the paper's scripts keep "paper"."""
    x, y = digits
    assert SparseMLPClassifier().init == "fan_in" and SparseMLPRegressor().init == "fan_in"
    clf = SparseMLPClassifier(**{k: v for k, v in SMALL.items()}).fit(x, y)
    assert clf.model_.config()["init"] == "fan_in"
    assert cupynn.MLP([4, 3], device="cpu").init == "paper"


# ---------------------------------------------------------------- review 17
@pytest.mark.parametrize("cls", [SparseMLPClassifier, SparseMLPRegressor])
def test_early_stopping_refuses_a_validation_split_without_weight_up_front(digits, cls):
    """The mirror of "held out every sample of non-zero weight": a single non-zero weight that
    falls in the training part leaves nothing to score; fit says so before training."""
    from sklearn.model_selection import train_test_split
    from sklearn.utils import check_random_state

    x, y = digits
    x, y = x[:200], (y[:200] if cls is SparseMLPClassifier else y[:200] / 9.0)
    seed = int(check_random_state(0).randint(0, 2**31 - 1))  # the estimator's seed_
    stratify = y if cls is SparseMLPClassifier else None
    train, _ = train_test_split(numpy.arange(len(y)), test_size=0.5, random_state=seed,
                                stratify=stratify)
    w = numpy.zeros(len(y))
    w[train[0]] = 1.0
    clf = cls(**dict(SMALL, early_stopping=True, validation_fraction=0.5, random_state=0))
    with pytest.raises(ValueError, match=r"early_stopping's validation split "
                                         r"\(validation_fraction=0.5\) holds no sample of "
                                         r"non-zero weight"):
        clf.fit(x, y, sample_weight=w)
    assert not hasattr(clf, "model_")  # refused before any training
    # A warm start keeps its fitted network untouched.
    warm = cls(**dict(SMALL, max_iter=2, warm_start=True, random_state=0))
    with pytest.warns(ConvergenceWarning):
        warm.fit(x, y)
    before = warm.predict(x)
    warm.set_params(early_stopping=True, validation_fraction=0.5)
    with pytest.raises(ValueError, match="holds no sample of non-zero weight"):
        warm.fit(x, y, sample_weight=w)
    assert warm.n_iter_ == 2
    numpy.testing.assert_array_equal(warm.predict(x), before)


def test_partial_fit_says_classes_is_the_fourth_argument(digits):
    """partial_fit(X, y, sample_weight, classes) is MLPClassifier's order; classes passed
    third (the old order) is taken as sample_weight, and the first call says why it failed."""
    x, y = digits
    clf = SparseMLPClassifier(**SMALL)
    with pytest.raises(ValueError, match=r"first call of partial_fit needs classes=.*classes is "
                                         r"the 4th argument, as in MLPClassifier: pass "
                                         r"classes=\.\.\."):
        clf.partial_fit(x[:10], y[:10], numpy.arange(10))
    with pytest.raises(ValueError) as plain:  # no sample_weight: the plain message
        clf.partial_fit(x[:10], y[:10])
    assert "4th argument" not in str(plain.value)
    clf.partial_fit(x[:10], y[:10], None, numpy.arange(10))
    assert list(clf.classes_) == list(range(10))


def test_warm_start_compares_the_resolved_device_not_its_name(digits):
    """device 'auto' resolves to a backend; naming that backend continues the network (no
    warning), while a changed dtype still fits a new one."""
    import warnings

    from cupynn.backend import get_backend

    x, y = digits
    resolved = get_backend("auto").name  # "cpu" on a machine without a GPU
    clf = SparseMLPClassifier(**dict(SMALL, max_iter=2, warm_start=True, device="auto"))
    with pytest.warns(ConvergenceWarning):
        clf.fit(x, y)
    for device in (resolved, "auto"):
        clf.set_params(device=device)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            clf.fit(x, y)
        assert not [w for w in caught if "warm_start cannot continue" in str(w.message)]
    assert clf.n_iter_ == 6 and clf.model_.backend.name == resolved
    clf.partial_fit(x, y)  # partial_fit continues too
    assert clf.n_iter_ == 7
    clf.set_params(dtype="float64")
    with pytest.warns(ConvergenceWarning), \
            pytest.warns(UserWarning, match=r"warm_start cannot continue a network built with "
                                            r"other parameters \(dtype 'float32' -> "
                                            r"'float64'\)"):
        clf.fit(x, y)
    assert clf.n_iter_ == 2 and clf.model_.dtype == numpy.float64
