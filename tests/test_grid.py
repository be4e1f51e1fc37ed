"""The grid runner and the report: a synthetic grid with known numbers, and one tiny real grid."""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path

import numpy
import pytest

from conftest import shared_data
from cupynn.paper import grid, report
from cupynn.paper.grid import GridError, expected_arguments, plan, run_state, shell_commands

HAS_MATPLOTLIB = report._matplotlib() is not None


# ------------------------------------------------------------------ a synthetic grid
def _write_run(root: Path, dataset: str, key: str, density: float | None, seed: int,
               accuracies: list[float], *, status: str = "completed", induced=(),
               train_seconds: float = 1.0, redistribution_seconds: float = 0.0,
               peak: int = 1_000_000, auc: list[float] | None = None,
               health: list[tuple[int, int]] | None = None) -> Path:
    """One run directory as cupynn.paper.experiments writes it, with chosen numbers.

    ``induced`` lists (before, after) of the redistributions after epochs 1, 2, ….
    ``health`` lists (zero weights of 100, dead hidden neurons of 50) per epoch.
    """
    baseline = key[len("baseline-"):] if key.startswith("baseline-") else None
    name = f"{key}/s{seed}" if baseline else f"{key}/d{density:g}/s{seed}"
    out = root / dataset / name
    out.mkdir(parents=True)
    arguments = {"algorithm": "gradient-global" if baseline else key, "baseline": baseline,
                 "density": 0.1 if baseline else density, "seed": seed,
                 "epochs": len(accuracies), "batch_size": 512, "lr": 5e-4, "hidden": 256}
    arguments.update({"train_samples": 500_000, "val_samples": 100_000} if dataset == "higgs"
                     else {"train_from_test": 0.8, "no_augment": False})
    config = {"experiment": dataset, "arguments": arguments, "dataset": f"{dataset}: fake",
              "backend": "cpu", "device": "Test CPU (2 cores)", "versions": {"cupynn": "0.1.0"}}
    (out / "config.json").write_text(json.dumps(config))
    lines = []
    for epoch, accuracy in enumerate(accuracies, start=1):
        m = {"epoch": epoch, "train_loss": 1.0, "test_accuracy": accuracy,
             "train_seconds": train_seconds, "redistribution_seconds": 0.0,
             "peak_memory_bytes": peak - 1000 * (len(accuracies) - epoch), "nnz": [60, 40]}
        if health is not None:
            zeros, dead = health[epoch - 1]
            m.update(zero_weights=zeros, dead_neurons=dead,
                     health={"zero_weights": [zeros, 0],
                             "hidden": [{"neurons": 50, "no_input": 0, "no_output": 0,
                                         "inactive": dead, "dead": dead}]})
        if auc is not None:
            m["test_auc"] = auc[epoch - 1]
        if epoch <= len(induced):
            m.update(fraction=0.5, redistribution_seconds=redistribution_seconds,
                     induced_loss_before=induced[epoch - 1][0],
                     induced_loss_after=induced[epoch - 1][1])
        lines.append(json.dumps(m))
    (out / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))
    (out / "summary.json").write_text(json.dumps({"status": status, "message": ""}))
    return out


# Final accuracies (%) per (key, density) for seeds 0, 1, 2; the claims all hold.
HOLDS = {
    ("static", 0.1): [80, 81, 82], ("random", 0.1): [83, 84, 85], ("gradient", 0.1): [84, 84, 84],
    ("loss", 0.1): [83, 83, 86], ("gradient-global", 0.1): [88, 89, 90],
    ("woodfisher", 0.1): [87, 88, 89], ("woodtaylor", 0.1): [82, 83, 84],
    ("static", 0.03): [70, 70, 70], ("random", 0.03): [72, 72, 72],
    ("gradient-global", 0.03): [75, 75, 75], ("woodfisher", 0.03): [74, 74, 74],
    ("baseline-neuron", None): [90, 90.5, 91], ("baseline-parameter", None): [70, 71, 72],
}


def _synthetic_grid(root: Path, finals: dict, dataset: str = "kmnist", auc: bool = False) -> Path:
    for (key, density), values in finals.items():
        for seed, final in enumerate(values):
            accuracies = [0.5 * final / 100, final / 100]  # two epochs
            _write_run(root, dataset, key, density, seed, accuracies,
                       induced=([] if key.startswith("baseline")
                                else [(1.0, 1.0 + 0.01 * (seed + 1))]),
                       train_seconds=2.0 + seed, redistribution_seconds=0.5,
                       peak=(2_000_000 if key == "woodfisher" else 1_000_000) + seed * 100_000,
                       auc=[0.6, final / 100 - 0.1] if auc else None,
                       health=(None if key.startswith("baseline")
                               else [(0, 0), (seed + (10 if key == "random" else 0),
                                              5 if key == "random" else 0)]))
    return root


def _claims(text: str) -> list[str]:
    return [line for line in text.splitlines()
            if line.startswith("| ") and ("**holds**" in line or "**does not hold**" in line
                                          or "**not checked**" in line)]


def test_report_tables_and_claims_that_hold(tmp_path):
    grid_dir = _synthetic_grid(tmp_path / "grid", HOLDS)
    (grid_dir / "kmnist" / "grid.json").write_text(json.dumps({"dataset": "kmnist", "jobs": 2,
                                                                "threads_per_run": 1}))
    groups = report.group(report.load_runs(grid_dir))
    accuracy = report.final_stats(groups)
    s = accuracy[("gradient-global", 0.1)]
    assert (s.mean, s.std, s.n, s.min, s.max) == pytest.approx((0.89, 0.01, 3, 0.88, 0.90))
    induced = report.induced_stats(groups)[("random", 0.1)]
    assert induced.mean == pytest.approx(0.02) and induced.n == 3
    timing = report.timing_stats(groups)[("random", 0.1)]
    # train 2, 3, 4 s per epoch; one redistribution of 0.5 s in two epochs: 0.25 s per epoch.
    assert timing.train.mean == pytest.approx(3.0)
    assert timing.redistribution.mean == pytest.approx(0.25)
    assert timing.per_step.mean == pytest.approx(0.5)
    assert report.memory_stats(groups)[("woodfisher", 0.03)].mean == pytest.approx(2_100_000)

    path = report.write_report(grid_dir, out=sys.stderr)
    text = path.read_text()
    assert path == grid_dir / "report" / "report.md"
    assert "| gradient-global | 89.00 ± 1.00 (n=3) | 75.00 ± 0.00 (n=3) | — |" in text
    assert "| dense neuron-eq | — | — | 90.50 ± 0.50 (n=3) |" in text
    assert "| woodfisher | 2.1 ± 0.1 (n=3) | 2.1 ± 0.1 (n=3) | — |" in text  # peak MB
    assert "| random | 0.02 ± 0.01 (n=3) |" in text  # induced loss
    assert ("| random | 3.000 ± 1.000 | 0.250 ± 0.000 | 3.250 ± 1.000 | 0.500 ± 0.000 | 1.08× | 3 |"
            in text)
    assert "device: Test CPU (2 cores) (backend cpu)" in text
    assert "epochs: 2;" in text and "seeds: 0, 1, 2; densities: 0.1, 0.03" in text
    assert "run 2 at a time" in text and "timings include contention" in text
    claims = _claims(text)
    # one row each for 0.1 and 0.03 for the two per-density claims, one for the other three
    assert len(claims) == 7 and all("**holds**" in line for line in claims), claims
    assert "gap 1.50 points" in text  # neuron 90.5 − gradient-global 89
    # health: random's zeros 10, 11, 12 of 100 and 5 of 50 hidden neurons dead at epoch 2
    assert report.curve(groups[("random", 0.1)], report.zero_share)[1].tolist() == \
        pytest.approx([0.0, 0.11])
    assert "| random | 0.0 / 11.0 | 0.0 / 10.0 | 0.0 / 10.0 |" in text
    assert "| static | 0.0 / 1.0 | 0.0 / 0.0 | 0.0 / 0.0 |" in text
    if not HAS_MATPLOTLIB:
        if os.environ.get("CI", "").strip().lower() in ("true", "1"):
            pytest.fail("matplotlib is missing; the test extra brings it, and CI checks figures.")
        return
    import matplotlib.image

    for name in ("kmnist-accuracy-d0.1.png", "kmnist-accuracy-d0.03.png",
                 "kmnist-induced-loss.png", "kmnist-health-d0.1.png", "kmnist-health-d0.03.png"):
        assert (path.parent / name).stat().st_size > 1000 and f"]({name})" in text
        image = matplotlib.image.imread(path.parent / name)  # a readable PNG, drawn on
        assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 200
        assert image[..., :3].std() > 0.05, f"{name} is blank"


def test_claims_that_do_not_hold(tmp_path):
    finals = dict(HOLDS)
    finals[("baseline-parameter", None)] = [81, 81, 81]   # above static's 81 mean: no
    finals[("gradient", 0.1)] = [95, 95, 95]              # per-layer above globals and neuron-eq
    finals[("woodtaylor", 0.1)] = [79, 79, 79]            # a dynamic one below static
    finals[("gradient-global", 0.1)] = [87, 88, 89]       # 90.5 − 88 = 2.5 points from neuron-eq
    groups = report.group(report.load_runs(_synthetic_grid(tmp_path, finals)))
    claims = report.check_claims(groups, "kmnist")
    verdicts = [c.verdict for c in claims]
    assert verdicts == ["does not hold", "does not hold", "holds", "does not hold", "holds",
                        "does not hold", "does not hold"]
    assert "not above it: static 81.00 %, woodtaylor 79.00 %" in claims[0].evidence
    assert "best other: gradient at density 0.1 95.00 %" in claims[5].evidence
    assert "gap 2.50 points" in claims[6].evidence


def test_claims_not_checked_without_their_runs(tmp_path):
    finals = {k: v for k, v in HOLDS.items() if k[0] in ("static", "random")}
    claims = report.check_claims(report.group(report.load_runs(_synthetic_grid(tmp_path, finals))),
                                 "kmnist")
    assert [c.verdict for c in claims] == ["not checked", "not checked", "not checked", "holds",
                                           "holds", "not checked", "not checked"]
    assert claims[3].evidence == ("density 0.1: random 84.00 % vs static 81.00 % (not in the grid: "
                                  "gradient, gradient-global, loss, woodfisher, woodtaylor)")


def test_higgs_report_has_auc_and_the_1_percent_limit(tmp_path):
    finals = {k: v for k, v in HOLDS.items() if k[1] != 0.03}
    grid_dir = _synthetic_grid(tmp_path, finals, dataset="higgs", auc=True)
    text = report.write_report(grid_dir, tmp_path / "out", out=sys.stderr).read_text()
    assert "### Final test AUC" in text and "| gradient-global | 0.7900 ± 0.0100 (n=3) |" in text
    assert "training rows per epoch: 500000; validation rows: 100000" in text
    within = [line for line in _claims(text) if "within 1 %" in line]
    assert len(within) == 1 and "**does not hold**" in within[0]  # 1.5 points > 1


def test_report_without_matplotlib_still_has_the_tables(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    grid_dir = _synthetic_grid(tmp_path / "grid", HOLDS)
    assert report.main([str(grid_dir)]) == 0
    text = (grid_dir / "report" / "report.md").read_text()
    assert "Figures skipped: matplotlib is not installed" in text
    assert "| gradient-global | 89.00 ± 1.00 (n=3) |" in text and len(_claims(text)) == 7
    assert not list((grid_dir / "report").glob("*.png"))
    assert "figures skipped" in capsys.readouterr().out


def test_unfinished_runs_are_listed_and_left_out(tmp_path):
    grid_dir = _synthetic_grid(tmp_path, {("random", 0.1): [80, 90]})
    _write_run(tmp_path, "kmnist", "random", 0.1, 7, [0.1], status="interrupted")
    text = report.write_report(grid_dir, out=sys.stderr).read_text()
    assert "| random | 85.00 ± 7.07 (n=2) |" in text
    assert "runs: 3 found, 2 completed" in text
    assert "random/d0.1/s7`: interrupted" in text


def test_report_on_an_empty_directory_is_an_error(tmp_path, capsys):
    assert report.main([str(tmp_path)]) == 2
    assert "No runs (directories with config.json)" in capsys.readouterr().err


# ------------------------------------------------------------------ the grid runner
GRID_ARGS = ["--algorithms", "static", "random", "--densities", "0.1", "0.03", "--seeds", "0", "1",
             "--epochs", "3", "--train-from-test", "0.8"]
EXPECTED = ([f"{a}/d{d}/s{s}" for a in ("static", "random") for d in ("0.1", "0.03")
             for s in (0, 1)]
            + [f"baseline-{b}/s{s}" for b in ("neuron", "parameter") for s in (0, 1)])


def test_plan_names_every_run():
    runs = plan("kmnist", "g", algorithms=["static", "random"], densities=[0.1, 0.03],
                seeds=[0, 1], options={"epochs": 3, "train_from_test": 0.8, "lr": None})
    assert [r.name for r in runs] == EXPECTED
    assert all(r.out == Path("g").resolve() / "kmnist" / r.name for r in runs)
    assert runs[0].args == ("--algorithm", "static", "--density", "0.1", "--seed", "0",
                            "--epochs", "3", "--train-from-test", "0.8", "--quiet")
    assert runs[-1].args[:4] == ("--baseline", "parameter", "--seed", "1")
    assert len(plan("higgs", "g")) == 7 * 3 * 3 + 2 * 3  # the paper's grid


def test_print_commands_lists_exactly_the_runs(tmp_path, capsys):
    assert grid.main(["kmnist", "--grid-dir", str(tmp_path), *GRID_ARGS, "--print-commands",
                      "--", "--no-augment"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(EXPECTED)
    outs = []
    for line in lines:
        words = shlex.split(line)
        words = words[1:] if words[0].startswith("PYTHONPATH=") else words
        assert words[0] == sys.executable and words[1].endswith("scripts/train_kmnist.py")
        assert words[-2] == "--out" and words[-3] == "--no-augment" and "--epochs" in words
        outs.append(words[-1])
    assert outs == [str(tmp_path.resolve() / "kmnist" / name) for name in EXPECTED]
    assert not any(tmp_path.iterdir())  # printing writes nothing


@pytest.mark.parametrize("argv, message", [
    (["kmnist", "--val-samples", "10"], "unrecognized arguments: --val-samples 10"),
    (["higgs", "--train-from-test", "0.8"], "unrecognized arguments: --train-from-test 0.8"),
    (["kmnist", "--densities", "1.5"], "--density must be in (0, 1]"),
    (["kmnist", "--seeds"], "expected at least one argument"),
    (["kmnist", "--jobs", "0"], "--jobs must be >= 1"),
])
def test_bad_grid_options_exit_with_usage(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        grid.main([*argv, "--grid-dir", str(tmp_path), "--print-commands"])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_plan_rejects_unknown_names():
    with pytest.raises(GridError, match="Unknown algorithm 'rigl'. Valid names: static"):
        plan("kmnist", "g", algorithms=["rigl"])
    with pytest.raises(GridError, match="Unknown dataset 'mnist'"):
        plan("mnist", "g")


def _fake_state(run, *, summary=None, checkpoint=False, **changes):
    """A run directory holding config.json with the planned settings (plus changes)."""
    run.out.mkdir(parents=True)
    arguments = json.loads(json.dumps(expected_arguments(run), default=str))
    (run.out / "config.json").write_text(json.dumps({"arguments": {**arguments, **changes}}))
    if summary:
        (run.out / "summary.json").write_text(json.dumps({"status": summary}))
    if checkpoint:
        (run.out / "checkpoint.npz").write_bytes(b"")


def test_skip_resume_restart_and_conflict(tmp_path, capsys):
    runs = plan("kmnist", tmp_path, algorithms=["static", "random"], densities=[0.1, 0.03],
                seeds=[0, 1], options={"epochs": 3, "train_from_test": 0.8})
    by_name = {r.name: r for r in runs}
    _fake_state(by_name["static/d0.1/s0"], summary="completed", checkpoint=True, quiet=False,
                device="cpu")                                          # done: skipped
    _fake_state(by_name["static/d0.1/s1"], summary="interrupted", checkpoint=True)  # resumed
    _fake_state(by_name["random/d0.1/s0"], checkpoint=True)           # killed: resumed
    _fake_state(by_name["random/d0.1/s1"])                            # no checkpoint: restarted
    _fake_state(by_name["random/d0.03/s0"], summary="completed", epochs=2)  # other settings
    by_name["random/d0.03/s1"].out.mkdir(parents=True)
    (by_name["random/d0.03/s1"].out / "log.txt").write_text("earlier failure\n")  # only a log: new
    states = {r.name: run_state(r)[0] for r in runs}
    assert states["static/d0.1/s0"] == "completed"
    assert states["static/d0.1/s1"] == states["random/d0.1/s0"] == "resume"
    assert states["random/d0.1/s1"] == "restart"
    assert states["random/d0.03/s0"] == "conflict"
    assert "epochs 2 (planned 3)" in run_state(by_name["random/d0.03/s0"])[1]
    assert states["random/d0.03/s1"] == "new"
    resumed = by_name["static/d0.1/s1"]
    assert resumed.command()[-2:] == ["--resume", str(resumed.out)]
    assert by_name["random/d0.1/s1"].command()[-1] == "--overwrite"
    assert by_name["random/d0.03/s1"].command()[-2] == "--out"

    lines, notes = shell_commands(runs)
    assert len(lines) == len(runs) - 2  # neither the completed nor the conflicting run
    assert notes[0] == f"1 of {len(runs)} runs are already completed and not listed"
    assert "skipped random/d0.03/s0" in notes[1]
    # Running the grid starts nothing for the completed run and reports the conflict.
    outcomes = grid.execute([by_name["static/d0.1/s0"], by_name["random/d0.03/s0"]], progress=False)
    assert [o.state for o in outcomes] == ["skipped", "conflict"]
    assert grid.summarise(outcomes) == 1
    assert "random/d0.03/s0: conflict" in capsys.readouterr().err


# ------------------------------------------------------------------ one real tiny grid
def test_tiny_kmnist_grid_end_to_end(tmp_path, capsys):
    data = shared_data("kmnist")
    argv = ["kmnist", "--grid-dir", str(tmp_path), "--data-dir", str(data), "--train-from-test",
            "0.8", "--epochs", "1", "--algorithms", "static", "random", "--densities", "0.1",
            "--seeds", "0", "--jobs", "2", "--no-progress", "--", "--device", "cpu"]
    assert grid.main(argv) == 0
    names = ["static/d0.1/s0", "random/d0.1/s0", "baseline-neuron/s0", "baseline-parameter/s0"]
    for name in names:
        out = tmp_path / "kmnist" / name
        assert json.loads((out / "summary.json").read_text())["status"] == "completed", \
            (out / "log.txt").read_text()
        assert "completed: 1/1 epochs" in (out / "log.txt").read_text()
    assert json.loads((tmp_path / "kmnist" / "grid.json").read_text())["jobs"] == 2
    assert "grid: 4 completed" in capsys.readouterr().err

    # Again: nothing left to run. Then an interrupted run is resumed from its checkpoint.
    assert grid.main(argv) == 0
    assert "4 of 4 runs are already completed" in capsys.readouterr().err
    summary_path = tmp_path / "kmnist" / "static/d0.1/s0" / "summary.json"
    summary_path.write_text(json.dumps({"status": "interrupted"}))
    assert grid.main(argv) == 0
    log = (tmp_path / "kmnist" / "static/d0.1/s0" / "log.txt").read_text()
    assert "resume (summary status interrupted)" in log and "--resume" in log
    assert json.loads(summary_path.read_text())["status"] == "completed"

    # The report on it names the machine and the settings, and checks what it can.
    assert report.main([str(tmp_path)]) == 0
    text = (tmp_path / "report" / "report.md").read_text()
    assert "(backend cpu)" in text and "epochs: 1;" in text and "seeds: 0; densities: 0.1" in text
    assert "| dense param-eq | — | " in text and "| random | " in text
    claims = _claims(text)
    assert len(claims) == 5  # no global algorithm here: those two claims are not checked
    assert sum("**not checked**" in c for c in claims) == 2
    accuracies = [json.loads((tmp_path / "kmnist" / n / "summary.json").read_text())
                  ["final"]["test_accuracy"] for n in names]
    assert f"| static | {100 * accuracies[0]:.2f} (n=1) |" in text
    assert numpy.isfinite(accuracies).all()
    # The runs' metrics.jsonl carry the network's health, and the report draws it.
    epoch = json.loads((tmp_path / "kmnist" / names[1] / "metrics.jsonl").read_text()
                       .splitlines()[-1])
    assert epoch["zero_weights"] == sum(epoch["health"]["zero_weights"]) >= 0
    assert [h["neurons"] for h in epoch["health"]["hidden"]] == [256, 256]
    assert "### Network health per epoch" in text and "| random | " in text.split(
        "### Network health per epoch")[1].split("###")[0]


def test_a_failing_run_is_reported_with_its_log(tmp_path, capsys):
    empty = tmp_path / "no-data"
    empty.mkdir()
    argv = ["kmnist", "--grid-dir", str(tmp_path / "g"), "--data-dir", str(empty), "--algorithms",
            "static", "--densities", "0.1", "--seeds", "0", "--baselines", "--no-progress",
            "--", "--no-download", "--device", "cpu"]
    assert grid.main(argv) == 1
    err = capsys.readouterr().err
    log = tmp_path / "g" / "kmnist" / "static" / "d0.1" / "s0" / "log.txt"
    assert "1 run(s) did not complete" in err and f"log: {log}" in err
    assert "static/d0.1/s0: failed: exit status 2" in err  # the script's user error
    assert "kmnist-test-imgs" in log.read_text()


@pytest.mark.parametrize("launcher, prefix", [(None, ["mpiexec", "-n", "4"]),
                                              ("srun -n {ranks} --mpi=pmix",
                                               ["srun", "-n", "4", "--mpi=pmix"])])
def test_print_commands_for_several_ranks(tmp_path, capsys, launcher, prefix):
    argv = ["higgs", "--grid-dir", str(tmp_path), "--seeds", "0", "--algorithms", "random",
            "--densities", "0.1", "--baselines", "--print-commands", "--ranks", "4"]
    assert grid.main(argv + (["--launcher", launcher] if launcher else [])) == 0
    (line,) = capsys.readouterr().out.splitlines()
    words = shlex.split(line)
    words = words[1:] if words[0].startswith("PYTHONPATH=") else words
    assert words[:len(prefix)] == prefix
    assert words[len(prefix)] == sys.executable
    assert words[len(prefix) + 1].endswith("scripts/train_higgs.py")


@pytest.mark.parametrize("kwargs, message", [
    (dict(ranks=0), "--ranks must be an int >= 1. Got 0"),
    (dict(ranks=2, launcher="srun -n 2"), "--launcher must contain {ranks}"),
])
def test_plan_rejects_bad_ranks(kwargs, message):
    with pytest.raises(GridError, match=message):
        plan("higgs", "g", **kwargs)
    assert plan("higgs", "g", seeds=[0], algorithms=["random"], densities=[0.1],
                baselines=[])[0].launcher == ()


def test_report_includes_compositions(tmp_path):
    finals = dict(HOLDS)
    finals[("set+momentum", 0.1)] = [86, 86, 86]
    finals[("mest+gradient/global", 0.1)] = [85, 87, 89]
    root = _synthetic_grid(tmp_path, finals)
    path = report.write_report(root)
    text = path.read_text()
    assert "| set+momentum | 86.00 ± 0.00 (n=3) |" in text
    assert "| mest+gradient/global | 87.00 ± 2.00 (n=3) |" in text
    # After the paper's seven, before the dense baselines.
    order = [text.index(f"| {k} |") for k in ("woodtaylor", "mest+gradient/global",
                                                 "set+momentum", "dense neuron-eq")]
    assert order == sorted(order)
    assert "set+momentum" in text.split("algorithms and baselines:")[1].splitlines()[0]
