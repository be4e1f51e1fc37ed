"""Beyond the paper (SPEC §8): Erdős–Rényi allocation, schedule variants, redistribution
every t steps, and compositions in the scripts and the grid."""

from __future__ import annotations

import json
import math

import numpy
import pytest

import cupynn
from conftest import shared_data
from cupynn.init import erdos_renyi_densities, inputs_per_neuron
from cupynn.paper import grid
from cupynn.paper.experiments import KMNIST, build_parser, check_arguments, run
from cupynn.redistribution import fraction_at


# ----------------------------------------------------------------- Erdős–Rényi
def brute_force_er(shapes, density):
    """ε by bisection over the capped sum, independently of the library's loop."""
    def total(eps):
        return sum(min(1.0, eps * (i + o) / (i * o)) * i * o for i, o in shapes)

    budget = density * sum(i * o for i, o in shapes)
    lo, hi = 0.0, max(i * o for i, o in shapes)
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if total(mid) < budget else (lo, mid)
    return [min(1.0, lo * (i + o) / (i * o)) for i, o in shapes]


@pytest.mark.parametrize("shapes, density", [
    ([(784, 256), (256, 256), (256, 10)], 0.1),   # the output layer is capped at dense
    ([(21, 256), (256, 256), (256, 256)], 0.1),
    ([(784, 4096), (4096, 4096), (4096, 10)], 0.03),
    ([(10, 10), (10, 10)], 0.5),                   # equal layers: the density itself
    ([(5, 3), (3, 2)], 0.9),                        # both capped
])
def test_erdos_renyi_densities(shapes, density):
    got = erdos_renyi_densities(shapes, density)
    numpy.testing.assert_allclose(got, brute_force_er(shapes, density), rtol=1e-9)
    weights = [i * o for i, o in shapes]
    assert sum(d * w for d, w in zip(got, weights)) == pytest.approx(
        min(1.0, density) * sum(weights), rel=1e-12)
    free = [(d, i, o) for d, (i, o) in zip(got, shapes) if d < 1]
    if len(free) > 1:  # uncapped layers keep d in proportion to (in + out) / (in out)
        ratios = [d * i * o / (i + o) for d, i, o in free]
        assert max(ratios) == pytest.approx(min(ratios), rel=1e-12)


def test_mlp_with_erdos_renyi_allocation(backend):
    model = cupynn.MLP([784, 256, 256, 10], density=0.1, allocation="erdos-renyi",
                       device=backend, seed=1)
    expected = erdos_renyi_densities([(784, 256), (256, 256), (256, 10)], 0.1)
    assert model.densities == pytest.approx(tuple(expected))
    # SPEC §2 within each layer: n = max(1, round(d_l in)) inputs for every neuron.
    for layer, d in zip(model.layers, expected):
        n = inputs_per_neuron(d, layer.in_features)
        assert (numpy.diff(cupynn.to_numpy(layer.indptr)) == n).all()
    assert model.n_weights == sum(layer.out_features * inputs_per_neuron(d, layer.in_features)
                                  for layer, d in zip(model.layers, expected))
    assert abs(model.n_weights - 0.1 * (784 * 256 + 256 * 256 + 2560)) < 256  # rounding only
    # The configuration rebuilds the same model.
    again = cupynn.MLP(**{**model.config(), "device": backend})
    for a, b in zip(model.layers, again.layers):
        numpy.testing.assert_array_equal(cupynn.to_numpy(a.indices), cupynn.to_numpy(b.indices))
    assert model.config()["allocation"] == "erdos-renyi"
    dense_out = cupynn.MLP([21, 64, 64, 1], density=0.1, dense_layers=(-1,),
                           allocation="erdos-renyi", device=backend)
    assert dense_out.densities[-1] == 0.1 and isinstance(dense_out.layers[-1], cupynn.Linear)
    with pytest.raises(ValueError, match="The 'allocation' parameter of MLP must be one of"):
        cupynn.MLP([4, 3, 2], allocation="erk")


def test_a_checkpoint_from_before_allocations_still_loads(tmp_path):
    from cupynn.checkpoint import read_checkpoint, restore_checkpoint, save_checkpoint

    rng = numpy.random.default_rng(0)
    model = cupynn.MLP([8, 6, 3], density=0.5, device="cpu")
    trainer = cupynn.Trainer(model, cupynn.Adam(model), (rng.random((20, 8)), rng.integers(0, 3, 20)),
                             epochs=1, batch_size=10, progress=False)
    save_checkpoint(tmp_path, trainer)
    meta, arrays = read_checkpoint(tmp_path)
    del meta["model"]["allocation"]  # as written before this setting existed
    restore_checkpoint((meta, arrays), trainer)


# ----------------------------------------------------------------- schedules
def test_schedule_variants():
    e_end = 0.75 * 8
    assert [fraction_at(e, 8, 0.4, schedule="constant") for e in range(1, 9)] == \
        [0.4] * 5 + [0.0] * 3
    linear = [fraction_at(e, 8, 0.4, schedule="linear") for e in range(1, 9)]
    numpy.testing.assert_allclose(linear, [0.4 * (1 - e / e_end) if e < e_end else 0
                                           for e in range(1, 9)])
    cosine = [fraction_at(e, 8, 0.4) for e in range(1, 9)]
    numpy.testing.assert_allclose(cosine, [0.2 * (1 + math.cos(math.pi * e / e_end))
                                           if e < e_end else 0 for e in range(1, 9)])
    with pytest.raises(ValueError, match="The 'schedule' parameter of fraction_at must be one of"):
        fraction_at(1, 8, schedule="step")


def test_the_trainer_asks_its_schedule():
    """fit's schedule arguments make the trainer's Schedule, and that object alone says when
    and how much to redistribute: another one put in its place is followed."""
    from cupynn.redistribution.schedule import Schedule

    x, y = _blobs()
    model = cupynn.MLP([12, 16, 3], density=0.4, seed=0, device="cpu")
    trainer = cupynn.Trainer(model, cupynn.Adam(model, lr=1e-2), (x, y), epochs=4, batch_size=24,
                             redistribution="gradient", alpha=0.3, redistribute_every=4,
                             end_fraction=0.5, schedule="linear", redistribute_unit="step",
                             progress=False)
    s = trainer.schedule
    assert isinstance(s, Schedule)
    assert (s.epochs, s.alpha, s.every, s.end_fraction, s.kind, s.unit) == \
        (4, 0.3, 4, 0.5, "linear", "step")
    trainer.schedule = Schedule(4, alpha=0.2, every=6, kind="constant", unit="step")
    history = trainer.run()
    moves = [(m["step"], m["fraction"]) for h in history for m in h.get("redistributions", [])]
    assert moves == [(6, 0.2), (12, 0.2), (18, 0.2), (24, 0.2)]  # E_end = 30 of 40 steps


def _blobs(n=240, features=12, classes=3, seed=0):
    rng = numpy.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    x = rng.standard_normal((n, features)) + numpy.eye(classes, features)[y] * 2
    return x.astype(numpy.float32), y


@pytest.mark.parametrize("name", ["gradient", "woodfisher", "set+momentum", "mest+random/global"])
def test_redistribution_every_t_steps(backend, name):
    x, y = _blobs()
    model = cupynn.MLP([12, 16, 3], density=0.4, seed=0, device=backend)
    nnz = model.n_weights
    history = cupynn.fit(model, cupynn.Adam(model, lr=1e-2), (x, y), epochs=4, batch_size=24,
                         redistribution=name, redistribute_every=4, redistribute_unit="step",
                         schedule="linear", progress=False)
    moves = [m for h in history for m in h.get("redistributions", [])]
    total = 4 * 10
    steps = [s for s in range(4, total + 1, 4) if s < 0.75 * total]
    assert [m["step"] for m in moves] == steps
    for m in moves:
        assert m["fraction"] == pytest.approx(0.5 * (1 - m["step"] / (0.75 * total)))
        assert sum(r["added"] for r in m["redistribution"]) > 0
        assert m["induced_loss_before"] > 0 and m["seconds"] > 0
    assert all("fraction" not in h for h in history)  # no per-epoch redistribution
    assert model.n_weights == nnz
    assert history[0]["redistribution_seconds"] == pytest.approx(
        sum(m["seconds"] for m in history[0]["redistributions"]))


def test_step_wise_runs_resume_exactly(tmp_path):
    from cupynn.checkpoint import load_checkpoint, save_checkpoint

    x, y = _blobs()

    def trainer():
        model = cupynn.MLP([12, 16, 3], density=0.4, seed=0, dtype="float64", device="cpu")
        return cupynn.Trainer(model, cupynn.Adam(model, lr=1e-2), (x, y), epochs=4,
                              batch_size=24, redistribution="gradient", redistribute_every=5,
                              redistribute_unit="step", progress=False)

    straight = trainer()
    straight.run()
    first = trainer()  # two of the four epochs, as a run stopped after epoch 2
    for epoch in (1, 2):
        first.history.append(first.train_epoch(epoch))
        first.epoch = epoch
    save_checkpoint(tmp_path, first)
    resumed = trainer()
    load_checkpoint(tmp_path, resumed)
    resumed.run()
    for a, b in zip(straight.model.layers, resumed.model.layers):
        numpy.testing.assert_array_equal(a.to_dense(), b.to_dense())


# ----------------------------------------------------------------- scripts and grid
def _parse(*argv):
    parser = build_parser(KMNIST)
    args = parser.parse_args(list(argv))
    check_arguments(parser, args)
    return args


def test_script_arguments_compose_and_refuse_conflicts(capsys):
    assert _parse("--drop", "set", "--grow", "momentum").algorithm == "set+momentum"
    assert _parse("--drop", "mest", "--grow", "gradient", "--scope", "global").algorithm == \
        "mest+gradient/global"
    assert _parse("--algorithm", "set+momentum/global").algorithm == "set+momentum"
    assert _parse("--algorithm", "woodfisher", "--fisher-batches", "16").fisher_batches == 16
    for argv, message in [
        (["--drop", "set"], "--drop and --grow compose a redistribution together"),
        (["--algorithm", "loss", "--drop", "set", "--grow", "random"],
         "--algorithm and --drop/--grow both name"),
        (["--drop", "set", "--grow", "loss", "--scope", "global"],
         "The 'loss' growth takes scope 'layer'"),
        (["--scope", "global"], "--scope goes with --drop and --grow"),
        (["--algorithm", "gradient", "--fisher-batches", "4"],
         "--fisher-batches do(es) not apply to --algorithm gradient"),
        (["--algorithm", "set+bogus"], "Unknown growth 'bogus'"),
        (["--algorithm", "rigl"], "'rigl' is none of static"),
    ]:
        with pytest.raises(SystemExit) as info:
            _parse(*argv)
        assert info.value.code == 2 and message in capsys.readouterr().err


def test_a_composed_run_of_the_script(tmp_path):
    out = tmp_path / "run"
    assert run(KMNIST, ["--data-dir", str(shared_data("kmnist")), "--train-from-test", "0.2",
                        "--epochs", "2", "--hidden", "32", "--batch-size", "128", "--drop", "mest",
                        "--grow", "momentum", "--allocation", "erdos-renyi", "--schedule",
                        "constant", "--mest-lambda", "0.1", "--out", str(out), "--quiet",
                        "--device", "cpu"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["arguments"]["algorithm"] == "mest+momentum"
    assert config["model"]["allocation"] == "erdos-renyi"
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["fraction"] == 0.5  # constant schedule
    assert len(set(config["model"]["density"])) == 3  # the layers' own densities


def test_grid_takes_compositions(tmp_path, capsys):
    argv = ["kmnist", "--grid-dir", str(tmp_path), "--algorithms", "set+momentum",
            "mest+gradient/global", "set+random/layer", "--densities", "0.1", "--seeds", "0",
            "--baselines", "--print-commands"]
    assert grid.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert ["set+momentum" in lines[0], "mest+gradient/global" in lines[1],
            "--algorithm set+random " in lines[2] + " "] == [True, True, True]
    # A scope goes into the folder name after '@': one folder per run, not a subfolder.
    assert f"{tmp_path.resolve()}/kmnist/mest+gradient@global/d0.1/s0" in lines[1]
    with pytest.raises(SystemExit) as info:
        grid.main(["kmnist", "--grid-dir", str(tmp_path), "--algorithms", "set+bogus",
                   "--print-commands"])
    assert info.value.code == 2
    assert "or a composition '<drop>+<grow>[/<scope>]'" in capsys.readouterr().err
