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


def test_no_check_is_excused():
    assert SparseMLPClassifier._expected_failed_checks() == {}
    assert SparseMLPRegressor._expected_failed_checks() == {}


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
