"""The BackdoorBench plugin in a stand-in checkout (tests/fake_bench.py): install is
idempotent and reversible, --check reports readiness, and defense/pgbd.py runs like a
built-in defense, writing BackdoorBench's defense folder."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pgbd_defense.bench.installer import MANIFEST, check, install, planned_files, uninstall
from pgbd_defense.bench.installer import main as install_main
from pgbd_defense.bench.plugin import config_names

from .fake_bench import make_fake_checkout
from .test_records import _write

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def bench(tmp_path, tiny_data):
    _write(tmp_path, tiny_data, save_png=True)  # record at <tmp>/bench/record/tiny
    return make_fake_checkout(tmp_path / "bench", tiny_data)


def _tree(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_install_adds_only_new_files_and_is_idempotent(bench):
    before = _tree(bench)
    added, same = install(bench)
    assert sorted(added) == sorted(planned_files()) and same == []
    after = _tree(bench)
    assert sorted(set(after) - set(before)) == sorted([*planned_files(), MANIFEST])
    assert set(before) <= set(after)
    assert install(bench) == ([], list(planned_files()))
    assert _tree(bench) == after


def test_uninstall_removes_exactly_what_was_added(bench):
    before = _tree(bench)
    install(bench)
    removed = uninstall(bench)
    assert sorted(removed) == sorted(planned_files())
    assert _tree(bench) == before
    assert uninstall(bench) == []


def test_uninstall_refuses_to_delete_an_edited_file(bench, capsys):
    install(bench)
    launcher = bench / "defense" / "pgbd.py"
    launcher.write_text(launcher.read_text() + "# my change\n")
    assert install_main(["--bench-root", str(bench), "--uninstall"]) == 2
    assert "edited since installation: defense/pgbd.py" in capsys.readouterr().err
    assert launcher.is_file()
    assert install_main(["--bench-root", str(bench), "--uninstall", "--force"]) == 0
    assert not launcher.exists()


def test_install_never_overwrites_a_foreign_file(bench, capsys):
    (bench / "defense" / "pgbd.py").write_text("# someone else's defense\n")
    assert install_main(["--bench-root", str(bench)]) == 2
    assert "not from pgbd-defense" in capsys.readouterr().err
    assert (bench / "defense" / "pgbd.py").read_text() == "# someone else's defense\n"
    assert not (bench / "config" / "defense" / "pgbd").exists()


def test_configs_come_from_a_regular_install_too(tmp_path, monkeypatch):
    """Without the source tree beside the package, the YAMLs are read where setup.cfg's
    data_files put them (<prefix>/share/pgbd-defense/bench_configs/...)."""
    import pgbd_defense.bench.installer as inst

    shared = tmp_path / "share" / "pgbd-defense" / "bench_configs" / "defense" / "pgbd"
    shared.mkdir(parents=True)
    for name in config_names():
        (shared / name).write_text(f"# installed copy of {name}\n")
    monkeypatch.setattr(inst, "__file__", str(tmp_path / "site-packages" / "pgbd_defense" / "bench" / "installer.py"))
    monkeypatch.setattr(inst.sys, "prefix", str(tmp_path))
    assert inst.planned_files()["config/defense/pgbd/gtsrb.yaml"] == "# installed copy of gtsrb.yaml\n"
    (shared / "tiny.yaml").unlink()
    with pytest.raises(inst.InstallError, match="tiny.yaml not found"):
        inst.planned_files()


def test_not_a_checkout_is_named(tmp_path, capsys):
    assert install_main(["--bench-root", str(tmp_path)]) == 2
    assert "lacks defense/base.py" in capsys.readouterr().err


def test_check_reports_each_requirement(bench):
    results = {what: ok for what, ok, _ in check(bench)}
    assert results["BackdoorBench checkout"] and not results["plugin installed"]
    install(bench)
    results = check(bench)
    assert all(ok for _, ok, _ in results), results


def test_launcher_runs_like_a_builtin_defense(bench):
    install(bench)
    env = {**os.environ, "PGBD_NO_PROGRESS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "./defense/pgbd.py", "--result_file", "tiny", "--yaml_path",
           "./config/defense/pgbd/config.yaml", "--dataset", "mnist", "--preset", "cpu", "--epochs", "2",
           "--batch_size", "16", "--ratio", "0.5", "--device", "cpu"]
    proc = subprocess.run(cmd, cwd=bench, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = bench / "record" / "tiny" / "defense" / "pgbd"
    for name in ("defense_result.pt", "pgbd_df.csv", "pgbd_df_summary.csv", "index.txt", "summary.json"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["defense"] == "pgbd" and summary["clean_samples"] == 60
    # The benchmark's own test transform supplied the normalization (0.5, 0.5) and its data loader the images.
    config = (out / "config.yaml").read_text()
    assert "epochs: 2" in config
    # A second run refuses to overwrite, as the standalone command does.
    again = subprocess.run(cmd, cwd=bench, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "--overwrite" in again.stderr


FAKE_FT = '''
import argparse, os, sys
p = argparse.ArgumentParser()
for a in ("--result_file", "--yaml_path", "--dataset", "--index", "--device"):
    p.add_argument(a)
args, rest = p.parse_known_args()
assert os.path.isfile(args.index), args.index
assert os.path.isfile(args.yaml_path), args.yaml_path
out = os.path.join("record", args.result_file, "defense", "ft")
os.makedirs(out, exist_ok=True)
with open(os.path.join(out, "argv.txt"), "w") as f:
    f.write(args.yaml_path + "\\n" + " ".join(rest))
with open(os.path.join(out, "ft_df_summary.csv"), "w") as f:
    f.write(",test_acc,test_asr,test_ra\\nlast,0.5,0.25,0.6\\nvalid_max,0.5,0.25,0.6\\nexist_nan_value,False,False,False\\n")
print("fake ft done")
'''


def test_compare_inside_a_checkout_runs_the_benchmark_scripts_and_tabulates(bench, tmp_path, capsys):
    import shutil

    from pgbd_defense.run import main as run_main

    install(bench)
    shutil.copytree(bench / "record" / "tiny", bench / "record" / "badnet_0_1")
    (bench / "defense" / "ft.py").write_text(FAKE_FT)
    (bench / "config" / "defense" / "ft" / "config.yaml").write_text("epochs: 100\n")  # no mnist.yaml: the fallback
    (bench / "defense" / "nad.py").write_text("import sys\nprint('boom')\nsys.exit(1)\n")
    cwd = os.getcwd()
    os.environ["PGBD_NO_PROGRESS"] = "1"
    try:
        os.chdir(bench)
        code = run_main(["--attack", "badnet", "--dataset", "mnist", "--compare", "ft,nad", "--epochs", "1",
                         "--batch-size", "16", "--ratio", "0.5", "--preset", "cpu",
                         "--bench-args", "--lr 0.5 --epochs 2"])
    finally:
        os.chdir(cwd)
    assert code == 0
    yaml_path, flags = (bench / "record" / "badnet_0_1" / "defense" / "ft" / "argv.txt").read_text().splitlines()
    assert yaml_path == "./config/defense/ft/config.yaml"
    # our budget first, then --bench-args verbatim (argparse keeps the last --epochs: 2)
    assert flags == "--epochs 1 --batch_size 16 --lr 0.5 --epochs 2"
    table = (bench / "record" / "badnet_0_1" / "defense" / "comparison.csv").read_text().splitlines()
    assert table[0].startswith("defense,ca,asr,ra,dem,seconds,status,log")
    rows = {line.split(",")[0]: line for line in table[1:]}
    assert set(rows) == {"pgbd", "ft (BackdoorBench)", "nad (BackdoorBench)"}
    assert ",0.5,0.25,0.6," in rows["ft (BackdoorBench)"]
    assert ",failed," in rows["nad (BackdoorBench)"] and "pgbd_defense_compare.log" in rows["nad (BackdoorBench)"]
    md = (bench / "record" / "badnet_0_1" / "defense" / "comparison.md").read_text()
    assert "failed: see" in md


FAKE_ATTACK = '''
import argparse, os, shutil, sys
p = argparse.ArgumentParser()
for a in ("--yaml_path", "--dataset", "--bd_yaml_path", "--save_folder_name", "--epochs"):
    p.add_argument(a)
args = p.parse_args()
assert os.path.isfile(args.yaml_path), args.yaml_path
with open(os.path.join("record", args.save_folder_name + ".argv"), "w") as f:
    f.write(" ".join(sys.argv[1:]))
if args.epochs == "0":
    sys.exit("no epochs, no model")
shutil.copytree(os.path.join("record", "tiny"), os.path.join("record", args.save_folder_name))
'''


def test_a_missing_record_is_made_by_the_benchmarks_attack_script(bench, caplog):
    from pgbd_defense.run import main as run_main

    install(bench)
    (bench / "attack").mkdir(exist_ok=True)
    (bench / "attack" / "badnet.py").write_text(FAKE_ATTACK)
    prototype = bench / "config" / "attack" / "prototype"
    prototype.mkdir(parents=True)
    (prototype / "cifar10.yaml").write_text("dataset: cifar10\n")  # none for mnist, as in the benchmark
    common = ["--bench-root", str(bench), "--attack", "badnet", "--dataset", "mnist", "--epochs", "1",
              "--batch-size", "16", "--ratio", "0.5", "--preset", "cpu", "--no-progress"]
    assert run_main([*common, "--attack-args", "--epochs 0"]) == 2
    assert "the benchmark's badnet attack failed (exit code 1)" in caplog.text
    assert str(bench / "record" / "badnet_0_1.attack.log") in caplog.text
    assert not (bench / "record" / "badnet_0_1").exists()
    assert run_main([*common, "--attack-args", "--epochs 3"]) == 0
    assert (bench / "record" / "badnet_0_1.argv").read_text() == (
        "--yaml_path ./config/attack/prototype/cifar10.yaml --dataset mnist --bd_yaml_path "
        "./config/attack/badnet/default.yaml --save_folder_name badnet_0_1 --epochs 3")
    assert "has no config/attack/prototype/mnist.yaml" in caplog.text
    summary = json.loads((bench / "record" / "badnet_0_1" / "defense" / "pgbd" / "summary.json").read_text())
    assert summary["defense"] == "pgbd" and 0 <= summary["asr"] <= 1


def test_running_in_a_checkout_that_lacks_the_plugin_says_how_to_install(bench, caplog):
    from pgbd_defense.run import main as run_main

    assert run_main(["--bench-root", str(bench), "--attack", "badnet", "--dataset", "mnist", "--no-progress"]) == 2
    assert "python -m pgbd_defense.install --bench-root" in caplog.text


def test_each_checkout_is_imported_from_itself(tmp_path, tiny_data):
    """Two checkouts in one process: the second's ``utils`` must not be the first's."""
    import sys

    from pgbd_defense.bench.checkout import bench_imports

    roots = [make_fake_checkout(tmp_path / name, tiny_data) for name in ("a", "b")]
    for root in roots:
        with bench_imports(root):
            from utils.aggregate_block import dataset_and_transform_generate as mod

            assert Path(mod.__file__).resolve().is_relative_to(root.resolve())
        assert "utils" not in sys.modules and "utils.aggregate_block" not in sys.modules
        assert str(root.resolve()) not in sys.path


def test_a_checkout_of_namespace_packages_is_forgotten_cleanly(tmp_path):
    """The benchmark's ``utils`` has no __init__.py: its sub-packages' paths are computed
    from the parent's, which must still be there when they are looked at (a real checkout
    crashed here on the way out)."""
    import sys

    from pgbd_defense.bench.checkout import bench_imports

    (tmp_path / "nsutil" / "block").mkdir(parents=True)
    (tmp_path / "nsutil" / "block" / "gen.py").write_text("VALUE = 7\n")
    with bench_imports(tmp_path):
        from nsutil.block import gen

        assert gen.VALUE == 7
    assert not [n for n in sys.modules if n == "nsutil" or n.startswith("nsutil.")]


def test_compare_standalone_uses_the_same_clean_subset(tmp_path, tiny_data):
    from pgbd_defense.run import main as run_main

    folder, *_ = _write(tmp_path, tiny_data, save_png=False)
    assert run_main(["--record", str(folder), "--data-root", str(tiny_data), "--epochs", "1", "--te-epochs", "1",
                     "--batch-size", "16", "--ratio", "0.5", "--compare", "ft,nad", "--no-progress"]) == 0
    df = (folder / "defense" / "comparison.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in df[1:]] == ["pgbd", "ft", "nad"]
    pgbd_index = (folder / "defense" / "pgbd" / "index.txt").read_text()
    for cell in (folder / "defense").glob("ft_*"):
        assert (cell / "index.txt").read_text() == pgbd_index
