"""``atomforge data``: pack (sources, workers, resume after kill -9, append, invalid structures),
info, split, sample, export, and the errors a user meets (not a store, truncated, newer format,
two writers)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import ase.db
import ase.io
import lmdb
import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk
from ase.calculators.singlepoint import SinglePointCalculator

from atomforge import DataValidationError, StoreWriter, StructureStore, get_labels
from atomforge.cli import main
from atomforge.data import packing
from atomforge.data.store import close_readers
from atomforge.registry import make_registry


def labelled(n_atoms: int, seed: int, *, periodic: bool = False, **info: object) -> Atoms:
    """A labelled structure with atoms ≥ 1 Å apart, random energy, forces (and stress if periodic)."""
    rng = np.random.default_rng(seed)
    grid = np.argwhere(np.ones((3, 3, 3)))[:n_atoms] * 1.5
    atoms = Atoms(numbers=rng.choice([1, 6, 8, 29], n_atoms), positions=grid + rng.normal(0, 0.05, (n_atoms, 3)),
                  cell=np.eye(3) * 4.5 if periodic else None, pbc=periodic)
    atoms.info.update(info)
    atoms.arrays["charges_ref"] = rng.normal(size=n_atoms)
    atoms.calc = SinglePointCalculator(atoms, energy=float(rng.normal(-3.0 * n_atoms, 1.0)),
                                       forces=rng.normal(size=(n_atoms, 3)),
                                       **({"stress": rng.normal(size=6) * 0.01} if periodic else {}))
    return atoms


def write_fast_extxyz(path: Path, n: int, n_atoms: int = 3) -> None:
    """``n`` small labelled frames, formatted directly (ase.io.write is slow for tens of thousands)."""
    rng = np.random.default_rng(1)
    energies, data = rng.normal(size=n), rng.normal(size=(n, n_atoms, 6))
    data[:, :, :3] += np.arange(n_atoms)[None, :, None] * 1.2
    header = f'{n_atoms}\nProperties=species:S:1:pos:R:3:forces:R:3 energy=%.8f pbc="F F F"\n'
    rows = "H %.8f %.8f %.8f %.8f %.8f %.8f\n" * n_atoms
    path.write_text("".join(header % e + rows % tuple(d.ravel()) for e, d in zip(energies, data)))


def run_cli(capsys: pytest.CaptureFixture, *argv: object) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def records(path: Path) -> dict[bytes, bytes]:
    """Every structure record of a store, raw (equal records: equal positions, labels, info)."""
    with StructureStore(path).env.begin() as txn:
        return {bytes(k): bytes(v) for k, v in txn.cursor() if bytes(k).startswith(b"s")}


def same_structure(a: Atoms, b: Atoms, atol: float = 0.0) -> None:
    la, lb = get_labels(a), get_labels(b)
    assert np.array_equal(a.numbers, b.numbers) and np.allclose(a.positions, b.positions, atol=atol, rtol=0)
    assert np.allclose(a.cell[:], b.cell[:], atol=atol) and list(a.pbc) == list(b.pbc)
    assert (la.energy is None) == (lb.energy is None) and (la.energy is None or abs(la.energy - lb.energy) <= atol)
    for key in ("forces", "stress"):
        x, y = getattr(la, key), getattr(lb, key)
        assert (x is None) == (y is None) and (x is None or np.allclose(x, y, atol=atol, rtol=0))


@pytest.fixture()
def sources(tmp_path: Path) -> dict[str, Path]:
    """An extxyz (molecules and periodic cells, config types, groups, extra arrays), an ASE db
    (key-value pairs: fidelity), and a POSCAR (pymatgen, unlabelled)."""
    frames = [labelled(3 + k % 6, k, periodic=k % 2 == 0, config_type="cell" if k % 2 == 0 else "mol",
                       group=k // 3) for k in range(24)]
    ase.io.write(tmp_path / "a.extxyz", frames)
    with ase.db.connect(tmp_path / "b.db") as db:
        for k in range(3):
            db.write(labelled(4, 100 + k), fidelity=1)
    ase.io.write(tmp_path / "POSCAR", bulk("Cu", "fcc", 3.6), format="vasp")
    return {"extxyz": tmp_path / "a.extxyz", "db": tmp_path / "b.db", "poscar": tmp_path / "POSCAR"}


def test_help_lists_the_data_commands(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "data" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["data", "--help"])
    help_text = capsys.readouterr().out
    assert all(name in help_text for name in ("pack", "info", "split", "sample", "export"))


def test_pack_any_source_workers_give_the_same_store_and_export_round_trips(sources, tmp_path, capsys) -> None:
    files = [sources["extxyz"], sources["db"], sources["poscar"]]
    assert run_cli(capsys, "data", "pack", tmp_path / "one", *files, "--quiet")[0] == 0
    code, out, _ = run_cli(capsys, "data", "pack", tmp_path / "two", *files, "--workers", 2, "--commit-every", 5,
                           "--quiet")
    assert code == 0 and json.loads(out)["added"] == 28
    assert records(tmp_path / "one") == records(tmp_path / "two")  # byte for byte, whatever the workers

    store, read_back = StructureStore(tmp_path / "one"), ase.io.read(sources["extxyz"], ":")
    for k, atoms in enumerate(read_back):
        same_structure(store[k], atoms)
        assert store[k].info["config_type"] == atoms.info["config_type"]
        assert np.array_equal(store[k].arrays["charges_ref"], atoms.arrays["charges_ref"])
    assert store.column("fidelity").tolist() == [0] * 24 + [1] * 3 + [0]  # the db's key-value pairs kept
    assert get_labels(store[27]).energy is None and len(store[27]) == 1  # the POSCAR: unlabelled

    code, out, _ = run_cli(capsys, "data", "info", tmp_path / "one", "--json", "--full")
    info = json.loads(out)
    assert info["structures"] == 28 and info["atoms"] == int(store.column("n_atoms").sum())
    assert info["labels"] == {"energy": 27, "forces": 27, "stress": 12}
    assert info["config_types"] == {"cell": 12, "mol": 12, "(none)": 4} and info["fidelities"] == {"0": 25, "1": 3}
    assert info["groups"] == {"count": 8, "ungrouped": 4} and sorted(info["elements"]) == ["C", "Cu", "H", "O"]
    assert info["atoms_per_structure"]["max"] == 8 and isinstance(info["bytes"]["per_structure"], float)
    assert all(s["complete"] for s in info["sources"]) and [s["first"] for s in info["sources"]] == [0, 24, 27]
    energies = [get_labels(a).energy / len(a) for a in store if get_labels(a).energy is not None]
    assert info["full"]["energy_per_atom"]["mean"] == pytest.approx(np.mean(energies))
    assert info["full"]["element_counts"]["Cu"] == int(sum((a.numbers == 29).sum() for a in store))
    assert "atoms/struct" in run_cli(capsys, "data", "info", tmp_path / "one")[1]

    code, out, _ = run_cli(capsys, "data", "export", tmp_path / "one", tmp_path / "out.extxyz", "--indices", "2:26")
    exported = ase.io.read(tmp_path / "out.extxyz", ":")
    via_source = make_registry().get("data_sources", "ase").factory({"path": str(tmp_path / "out.extxyz")}, tmp_path)
    assert code == 0 and len(exported) == len(via_source) == 24
    for k, (atoms, again) in enumerate(zip(exported, via_source)):
        same_structure(atoms, store[k + 2], atol=1e-8)
        same_structure(again, store[k + 2], atol=1e-8)
        assert atoms.info.get("config_type") == store[k + 2].info.get("config_type")
        extra = store[k + 2].arrays.get("charges_ref")  # extxyz frames carry it, the db rows do not
        assert (extra is None) == ("charges_ref" not in atoms.arrays)
        assert extra is None or np.allclose(atoms.arrays["charges_ref"], extra, atol=1e-8)


def test_compressed_store_holds_the_same_structures(sources, tmp_path, capsys) -> None:
    run_cli(capsys, "data", "pack", tmp_path / "plain", sources["extxyz"], "--quiet")
    run_cli(capsys, "data", "pack", tmp_path / "zlib", sources["extxyz"], "--compress", "--quiet")
    plain, packed = StructureStore(tmp_path / "plain"), StructureStore(tmp_path / "zlib")
    assert packed.meta["compress"] and not plain.meta["compress"]
    for a, b in zip(plain, packed):
        same_structure(a, b)


def test_rerun_skips_complete_files_appends_new_ones_and_refuses_changed_ones(sources, tmp_path, capsys) -> None:
    store = tmp_path / "s"
    run_cli(capsys, "data", "pack", store, sources["extxyz"])
    code, out, err = run_cli(capsys, "data", "pack", store, sources["extxyz"], tmp_path / "*.db")
    assert code == 0 and "already packed (24 structures), skipped" in err
    assert json.loads(out)["added"] == 3 and len(StructureStore(store)) == 27
    with open(sources["extxyz"], "a") as handle:
        ase.io.write(handle, labelled(3, 99), format="extxyz")
    code, _, err = run_cli(capsys, "data", "pack", store, sources["extxyz"])
    assert code == 2 and "changed (size or modification time) since it was packed" in err
    assert len(StructureStore(store)) == 27


def test_kill_9_mid_pack_then_rerun_equals_a_pack_in_one_go(tmp_path, capsys) -> None:
    big, n, every = tmp_path / "big.extxyz", 12000, 500
    write_fast_extxyz(big, n)
    store = tmp_path / "killed"
    child = subprocess.Popen([sys.executable, "-m", "atomforge", "data", "pack", str(store), str(big),
                              "--commit-every", str(every), "--quiet"], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    deadline, count = time.monotonic() + 60, 0
    while time.monotonic() < deadline and child.poll() is None and count == 0:
        time.sleep(0.02)
        try:
            count = len(StructureStore(store))
        except Exception:  # noqa: BLE001 - not created / no first commit yet
            continue
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert child.returncode == -signal.SIGKILL, "the pack finished before it could be killed; make the file bigger"
    killed = StructureStore(store)
    done = len(killed)
    assert 0 < done < n and done % every == 0
    assert len(killed[done - 1]) == 3  # the last committed structure decodes
    [entry] = killed.meta["sources"].values()
    assert entry["done"] == done and not entry["complete"]
    killed.close()

    code, _, err = run_cli(capsys, "data", "pack", store, big, "--commit-every", every)
    assert code == 0 and f"resuming after structure {done - 1}" in err
    assert run_cli(capsys, "data", "pack", tmp_path / "once", big, "--quiet")[0] == 0
    resumed, once = records(store), records(tmp_path / "once")
    assert len(resumed) == len(once) == n and resumed == once
    a, b = StructureStore(store), StructureStore(tmp_path / "once")
    for k in (0, done - 1, done, n - 1):
        same_structure(a[k], b[k])


def bad_extxyz(path: Path) -> None:
    """Six frames; frame 3's forces have 2 components per atom (a wrong-shape label)."""
    frames = [labelled(4, k) for k in range(6)]
    ase.io.write(path, frames)
    lines = path.read_text().splitlines(keepends=True)
    at = 3 * 6  # 6 lines per frame
    lines[at + 1] = lines[at + 1].replace("forces:R:3", "forces:R:2")
    for row in range(at + 2, at + 6):
        lines[row] = " ".join(lines[row].split()[:-1]) + "\n"
    path.write_text("".join(lines))


def test_wrong_shape_label_names_file_and_index_and_keeps_what_came_before(tmp_path, capsys) -> None:
    bad, store = tmp_path / "bad.extxyz", tmp_path / "s"
    bad_extxyz(bad)
    code, _, err = run_cli(capsys, "data", "pack", store, bad, "--commit-every", 2)
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert f"structure 3 of {bad}: forces label has shape (4, 2); expected (4, 3)" in err
    kept = StructureStore(store)
    assert len(kept) == 3 and list(kept.meta["sources"].values())[0]["done"] == 3
    kept.close()

    code, out, err = run_cli(capsys, "data", "pack", store, bad, "--skip-invalid")
    report = json.loads(out)
    assert code == 0 and report["added"] == 2 and report["invalid"] == 1
    assert report["invalid_examples"][0].startswith(f"structure 3 of {bad}: forces label has shape")
    assert "skipped 1 invalid structure" in err
    assert len(StructureStore(store)) == 5 and StructureStore(store).meta["sources"][
        next(iter(StructureStore(store).meta["sources"]))]["skipped"] == 1

    atoms = labelled(5, 7)
    atoms.calc = SinglePointCalculator(atoms, energy=1.0, forces=np.zeros((4, 3)))
    with ase.db.connect(tmp_path / "bad.db") as db:
        db.write(labelled(5, 6))
        db.write(atoms)
    code, _, err = run_cli(capsys, "data", "pack", tmp_path / "d", tmp_path / "bad.db")
    assert code == 2 and f"structure 1 of {tmp_path / 'bad.db'}: forces label has shape (4, 3); expected (5, 3)" in err


def atoms_list(options: dict, base_dir: Path) -> list[Atoms]:
    """A data source returning Atoms objects; with ``bad``, the fourth has forces of shape (n-1, 3)."""
    structures = [labelled(4, k) for k in range(6)]
    if options.get("bad"):
        structures[3].calc.results["forces"] = np.zeros((3, 3))
    return structures


@pytest.mark.parametrize("workers", [1, 2])
def test_atoms_list_with_a_bad_label_is_refused_with_its_index(tmp_path, workers) -> None:
    good, bad = (packing.PackSource(name, name, packing.SourceKind.PLUGIN, {}, factory=atoms_list,
                                    options={"bad": name == "bad list"}) for name in ("good list", "bad list"))
    settings = packing.PackSettings(workers=workers, commit_every=4, progress=False)
    with pytest.raises(DataValidationError, match=r"structure 3 of bad list: forces label has shape \(3, 3\)"):
        packing.pack(tmp_path / "s", [good, bad], settings)
    store = StructureStore(tmp_path / "s")
    assert len(store) == 9 and store.meta["sources"]["good list"]["complete"]
    assert store.meta["sources"]["bad list"] == {"spec": {}, "done": 3, "complete": False, "first": 6, "skipped": 0}


def test_split_keeps_groups_whole_is_reproducible_and_refuses_to_overwrite(tmp_path, capsys) -> None:
    store = tmp_path / "s"
    with StoreWriter(store) as writer:
        for k in range(90):
            writer.append(labelled(3, k, group=k // 3, config_type=f"t{k % 5}"))
    code, out, _ = run_cli(capsys, "data", "split", store, "--valid", 0.1, "--test", 0.2, "--seed", 3)
    assert code == 0 and "train 63" in out and "valid 9" in out and "test 18" in out
    s = StructureStore(store)
    groups = s.column("group")
    parts = {name: s.split(name) for name in ("train", "valid", "test")}
    assert sorted(np.concatenate(list(parts.values())).tolist()) == list(range(90))
    owners = [{name for name, idx in parts.items() if g in set(groups[idx].tolist())} for g in range(30)]
    assert all(len(o) == 1 for o in owners)  # no group in two splits
    assert s.splits()["test"] == {"count": 18, "seed": 3, "by": "group", "fraction": 0.2}

    code, _, err = run_cli(capsys, "data", "split", store, "--valid", 0.1, "--test", 0.2, "--seed", 3)
    assert code == 2 and "already has the split(s) test, train, valid; pass --force" in err
    run_cli(capsys, "data", "split", store, "--valid", 0.1, "--test", 0.2, "--seed", 3, "--force")
    s.reload()
    assert all(np.array_equal(s.split(name), idx) for name, idx in parts.items())  # same seed, same split
    run_cli(capsys, "data", "split", store, "--valid", 0.1, "--test", 0.2, "--seed", 4, "--force")
    s.reload()
    assert not np.array_equal(s.split("test"), parts["test"])
    run_cli(capsys, "data", "split", store, "--valid", 0.2, "--test", 0.2, "--by", "config_type", "--force")
    s.reload()
    kinds = s.column("config_type")
    assert all(len({name for name in parts if t in set(kinds[s.split(name)].tolist())}) == 1 for t in range(5))

    code, out, _ = run_cli(capsys, "data", "sample", store, tmp_path / "x.extxyz", "-n", 7, "--split", "train")
    sampled = ase.io.read(tmp_path / "x.extxyz", ":")
    train = {tuple(np.round(s[i].positions.ravel(), 6)) for i in s.split("train")}
    assert code == 0 and len(sampled) == 7 and all(tuple(np.round(a.positions.ravel(), 6)) in train for a in sampled)
    run_cli(capsys, "data", "sample", store, tmp_path / "y.extxyz", "-n", 7, "--split", "train")
    assert (tmp_path / "x.extxyz").read_text() == (tmp_path / "y.extxyz").read_text()  # seeded
    code, _, err = run_cli(capsys, "data", "sample", store, tmp_path / "z.extxyz", "-n", 1000)
    assert code == 2 and "expected 1 ≤ n ≤ 90" in err


def test_campaign_labelled_set_is_packed_and_new_labels_appended(tmp_path, capsys) -> None:
    from atomforge.active_learning._store import LabelledSet

    campaign = tmp_path / "campaign"
    campaign.mkdir()
    ase.io.write(campaign / "initial.extxyz", [labelled(4, k) for k in range(3)])
    labelled_set = LabelledSet(campaign / "labelled.extxyz")
    for k in range(4):
        labelled_set.append(labelled(5, 10 + k), f"key{k}")
    assert run_cli(capsys, "data", "pack", tmp_path / "s", "--campaign", campaign)[0] == 0
    assert len(StructureStore(tmp_path / "s")) == 7
    for k in range(4, 6):
        labelled_set.append(labelled(5, 10 + k), f"key{k}")
    with open(campaign / "labelled.extxyz", "a") as handle:
        handle.write("5\nProperties=species:S:1:pos:R:3 energy=1.0\nH 0 0 0\n")  # a driver mid-append
    code, out, err = run_cli(capsys, "data", "pack", tmp_path / "s", "--campaign", campaign)
    assert code == 0 and json.loads(out)["added"] == 2 and "initial.extxyz: already packed" in err
    store = StructureStore(tmp_path / "s")
    assert [store[i].info["al_key"] for i in range(3, 9)] == [f"key{k}" for k in range(6)]


def test_plugin_source_with_options(sources, tmp_path, capsys) -> None:
    argv = ("data", "pack", tmp_path / "s", "--source", "pymatgen", "--option", f"path={sources['poscar']}")
    assert run_cli(capsys, *argv)[0] == 0
    assert len(StructureStore(tmp_path / "s")) == 1
    assert "already packed" in run_cli(capsys, *argv)[2]
    code, _, err = run_cli(capsys, "data", "pack", tmp_path / "t", "--source", "nope", "--option", "path=x")
    assert code == 2 and "nope" in err and "pymatgen" in err  # unknown names list the valid ones


def one_line_error(capsys, *argv: object) -> str:
    code, _, err = run_cli(capsys, *argv)
    assert code == 2 and err.startswith("atomforge: error: ") and len(err.strip().splitlines()) == 1
    return err


def test_store_errors_are_one_line_messages(sources, tmp_path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    assert "is not a structure store" in one_line_error(capsys, "data", "info", tmp_path / "empty")
    assert "is not a structure store" in one_line_error(capsys, "data", "info", sources["extxyz"])
    assert "not a structure store" in one_line_error(capsys, "data", "pack", tmp_path, sources["extxyz"])

    store = tmp_path / "s"
    run_cli(capsys, "data", "pack", store, sources["extxyz"], "--quiet")
    close_readers()  # one LMDB handle per environment and process
    env = lmdb.open(str(store), subdir=True)
    with env.begin(write=True) as txn:
        meta = json.loads(txn.get(b"meta"))
        txn.put(b"meta", json.dumps({**meta, "version": meta["version"] + 1}).encode())
    env.close()
    assert "newer atomforge" in one_line_error(capsys, "data", "info", store)

    run_cli(capsys, "data", "pack", tmp_path / "t", sources["extxyz"], "--quiet")
    data = (tmp_path / "t" / "data.mdb").read_bytes()
    (tmp_path / "t" / "data.mdb").write_bytes(data[: len(data) // 2])
    assert "truncated" in one_line_error(capsys, "data", "info", tmp_path / "t")


def test_a_second_writer_fails_at_once(sources, tmp_path) -> None:
    with StoreWriter(tmp_path / "s"):
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "atomforge", "data", "pack", str(tmp_path / "s"),
                               str(sources["extxyz"])], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and time.monotonic() - started < 30
    assert done.stderr.startswith("atomforge: error: ") and "Traceback" not in done.stderr
    assert f"is being written by pid {os.getpid()}" in done.stderr
