"""Make a BackdoorBench checkout know PGBD, undo it, or check that a checkout is ready.

    python -m pgbd_defense.install --bench-root path/to/BackdoorBench
    python -m pgbd_defense.install --bench-root path/to/BackdoorBench --check
    python -m pgbd_defense.install --bench-root path/to/BackdoorBench --uninstall

Only new files are added: ``defense/pgbd.py`` (a thin launcher importing this
installed package) and ``config/defense/pgbd/*.yaml`` (from ``bench_configs/``), plus
a manifest ``.pgbd_defense_install.json`` listing them with their hashes. None of
the benchmark's files is edited. Installing twice changes nothing; ``--uninstall``
removes exactly the files the manifest lists, and refuses (unless ``--force``) to
delete one that was edited since.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from ..errors import UserError
from ..util.atomic import atomic_write_text
from .checkout import NotACheckoutError, missing_markers, require_checkout
from .plugin import config_names, launcher_text

MANIFEST = ".pgbd_defense_install.json"


class InstallError(UserError, RuntimeError):
    """Installing would overwrite a file that is not ours, or uninstalling would delete an edited one."""


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _config_text(name: str) -> str:
    """Our bench_configs YAML: from the source tree (editable install), else from where a
    regular install puts it (setup.cfg's data_files, under the environment's prefix)."""
    rel = Path("bench_configs") / "defense" / "pgbd" / name
    places = [Path(__file__).resolve().parents[2] / rel, Path(sys.prefix) / "share" / "pgbd-defense" / rel]
    for place in places:
        if place.is_file():
            return place.read_text()
    raise InstallError(f"{name} not found in {' or '.join(str(p.parent) for p in places)}: reinstall pgbd-defense "
                       "(pip install .) or install it from its source tree (pip install -e .)")


def planned_files() -> Dict[str, str]:
    files = {"defense/pgbd.py": launcher_text()}
    for name in config_names():
        files[f"config/defense/pgbd/{name}"] = _config_text(name)
    return files


def install(root: Path) -> Tuple[List[str], List[str]]:
    """Returns (added, already present and identical)."""
    root = require_checkout(root)
    manifest = _read_manifest(root)
    ours = set(manifest)
    added, same = [], []
    plan = planned_files()
    for rel, text in plan.items():  # check everything before writing anything
        path = root / rel
        if path.exists() and rel not in ours and path.read_text() != text:
            raise InstallError(f"{path} exists and is not from pgbd-defense; move it away first "
                               "(nothing was installed)")
    for rel, text in plan.items():
        path = root / rel
        if path.exists() and path.read_text() == text:
            same.append(rel)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, text)
        added.append(rel)
    atomic_write_text(root / MANIFEST, json.dumps({rel: _sha(t) for rel, t in plan.items()}, indent=1) + "\n")
    return added, same


def uninstall(root: Path, force: bool = False) -> List[str]:
    root = require_checkout(root)
    manifest = _read_manifest(root)
    if not manifest:
        return []
    edited = [rel for rel, digest in manifest.items()
              if (root / rel).is_file() and _sha((root / rel).read_text()) != digest]
    if edited and not force:
        raise InstallError(f"edited since installation: {', '.join(edited)}; nothing was removed "
                           "(keep a copy and pass --force to remove them anyway)")
    removed = []
    for rel in manifest:
        path = root / rel
        if path.is_file():
            path.unlink()
            removed.append(rel)
    folder = root / "config" / "defense" / "pgbd"
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
    (root / MANIFEST).unlink(missing_ok=True)
    return removed


def _read_manifest(root: Path) -> Dict[str, str]:
    path = root / MANIFEST
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except ValueError:
        raise InstallError(f"{path} is damaged; delete it and the files it listed by hand") from None
    return data if isinstance(data, dict) else {}


def check(root: Path, python: str = sys.executable) -> List[Tuple[str, bool, str]]:
    """(what, ok, detail) for each thing a run inside the checkout needs."""
    root = Path(root).resolve()
    results = []
    missing = missing_markers(root) if root.is_dir() else ["the folder itself"]
    results.append(("BackdoorBench checkout", not missing, "missing " + ", ".join(missing) if missing else str(root)))
    if missing:
        return results
    plan = planned_files()
    stale = [rel for rel, text in plan.items() if not (root / rel).is_file() or (root / rel).read_text() != text]
    results.append(("plugin installed", not stale, "missing or outdated: " + ", ".join(stale) + " (run install)"
                    if stale else "defense/pgbd.py and config/defense/pgbd/"))
    probe = ("import pgbd_defense, defense.base, utils.save_load_attack, "
             "utils.aggregate_block.dataset_and_transform_generate, utils.aggregate_block.model_trainer_generate")
    proc = subprocess.run([python, "-c", f"import sys; sys.path.insert(0, '.'); {probe}"], cwd=root,
                          capture_output=True, text=True)
    detail = "ok" if proc.returncode == 0 else (proc.stderr.strip().splitlines() or ["failed"])[-1] + \
        " (install the benchmark's requirements in this Python)"
    results.append(("imports (pgbd_defense and the benchmark's modules)", proc.returncode == 0, detail))
    data = root / "data"
    results.append(("data folder", data.is_dir(), str(data) if data.is_dir() else f"{data} missing: the benchmark "
                    "reads clean data from ./data/<dataset>"))
    record = root / "record"
    records = sorted(p.parent.name for p in record.glob("*/attack_result.pt")) if record.is_dir() else []
    results.append(("record folder", bool(records), f"{len(records)} record(s): {', '.join(records[:5])}"
                    if records else f"no record in {record}: run an attack first"))
    return results


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pgbd_defense.install", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bench-root", required=True, help="the BackdoorBench checkout")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--uninstall", action="store_true")
    mode.add_argument("--check", action="store_true")
    p.add_argument("--force", action="store_true", help="--uninstall: also remove files edited since")
    args = p.parse_args(argv)
    root = Path(args.bench_root)
    try:
        if args.check:
            results = check(root)
            for what, ok, detail in results:
                print(f"[{'ok' if ok else 'NO'}] {what}: {detail}")
            return 0 if all(ok for _, ok, _ in results) else 1
        if args.uninstall:
            removed = uninstall(root, args.force)
            print(f"removed {len(removed)} file(s): {', '.join(removed)}" if removed else "nothing to remove")
            return 0
        added, same = install(root)
        print(f"added {len(added)} file(s){': ' + ', '.join(added) if added else ''}; "
              f"{len(same)} already in place")
        print("run from the checkout root: python ./defense/pgbd.py --result_file <record> "
              "--yaml_path ./config/defense/pgbd/cifar10.yaml --dataset cifar10")
        return 0
    except (NotACheckoutError, InstallError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
