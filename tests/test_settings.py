"""fit and Trainer share one declaration of their settings (cupynn/settings.py)."""

from __future__ import annotations

import inspect

import numpy
import pytest

import cupynn
from cupynn.settings import REQUIRED, SETTINGS, check_settings


def test_fit_and_trainer_show_the_declared_settings():
    for function in (cupynn.fit, cupynn.Trainer):
        params = inspect.signature(function).parameters
        assert list(params)[:4] == ["model", "optimizer", "train", "test"]
        keywords = {n: p for n, p in params.items() if p.kind is p.KEYWORD_ONLY}
        assert list(keywords) == list(SETTINGS)
        assert all(keywords[n].default is s.default for n, s in SETTINGS.items())
    assert [n for n, s in SETTINGS.items() if s.default is REQUIRED] == ["epochs", "batch_size"]


def test_the_defaults_are_the_settings_of_a_plain_call():
    checked = check_settings({"epochs": 3, "batch_size": 8})
    assert checked["loss"] == "cross_entropy" and checked["alpha"] == 0.5
    assert checked["epochs"] == 3 and len(checked) == len(SETTINGS)


def tiny():
    x = numpy.random.default_rng(0).standard_normal((10, 4))
    model = cupynn.MLP([4, 3, 2], density=0.5, device="cpu")
    return model, cupynn.Adam(model), (x, (x[:, 0] > 0).astype(int))


@pytest.mark.parametrize("call", ["fit", "Trainer"])
def test_an_unknown_or_missing_setting_is_a_type_error(call):
    model, optimizer, train = tiny()
    function = getattr(cupynn, call)
    with pytest.raises(TypeError, match=r"fit\(\) got an unexpected keyword argument "
                                        r"'batchsize'\. Did you mean 'batch_size'\?"):
        function(model, optimizer, train, epochs=1, batchsize=4)
    with pytest.raises(TypeError, match=r"fit\(\) missing required keyword argument\(s\): "
                                        r"'batch_size'"):
        function(model, optimizer, train, epochs=1)


@pytest.mark.parametrize("name, value, error, message", [
    ("epochs", 0, ValueError, r"The 'epochs' parameter of fit must be in \[1, inf\]"),
    ("seed", -1, ValueError, "The 'seed' parameter of fit"),
    ("alpha", 1.5, ValueError, "The 'alpha' parameter of fit"),
    ("end_fraction", -0.1, ValueError, "The 'end_fraction' parameter of fit"),
    ("redistribute_every", 0, ValueError, "The 'redistribute_every' parameter of fit"),
    ("schedule", "cubic", ValueError, "The 'schedule' parameter of fit"),
    ("redistribute_unit", "batch", ValueError, "The 'redistribute_unit' parameter of fit"),
    ("loss", "hinge", ValueError, "The 'loss' parameter of fit"),
    ("augment", 3, TypeError, "The 'augment' parameter of fit must be callable"),
    ("on_epoch_end", "stop", TypeError, "The 'on_epoch_end' parameter of fit must be callable"),
])
def test_each_declared_check_names_fit(name, value, error, message):
    model, optimizer, train = tiny()
    settings = {"epochs": 1, "batch_size": 4, "progress": False, name: value}
    with pytest.raises(error, match=message):
        cupynn.fit(model, optimizer, train, **settings)
