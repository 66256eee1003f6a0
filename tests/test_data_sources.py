"""The built-in data sources ``ase`` and ``pymatgen``, used through the registry as a user would.

Every fixture file is written here from known numbers (no checked-in data): extxyz and ASE db
files through ASE, CIF/POSCAR/JSON through pymatgen, and a minimal but complete vasprun.xml
through :func:`write_vasprun`, which both pymatgen's ``Vasprun`` and ASE's ``vasp-xml`` reader
accept.
"""

from __future__ import annotations

import gzip
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk
from ase.units import GPa

from atomforge import (
    ConfigError,
    DataValidationError,
    GraphDataset,
    attach_labels,
    get_labels,
    keys as K,
    make_registry,
)

Reader = Callable[[dict[str, Any], Path], list[Atoms]]

POS_TOL = 1e-6  # Å


@pytest.fixture(scope="module")
def read_ase() -> Reader:
    return make_registry().get("data_sources", "ase").factory


@pytest.fixture(scope="module")
def read_pymatgen() -> Reader:
    return make_registry().get("data_sources", "pymatgen").factory


# --------------------------------------------------------------------------------------------
# ase source
# --------------------------------------------------------------------------------------------


def labelled_cu(n: int, seed: int = 0) -> list[Atoms]:
    """``n`` rattled 4-atom Cu cells with arbitrary but known energy, forces and (symmetric) stress."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        atoms = bulk("Cu", "fcc", a=3.61, cubic=True)
        atoms.positions += rng.normal(0.0, 0.05, atoms.positions.shape)
        sym = rng.normal(0.0, 0.01, (3, 3))
        out.append(attach_labels(
            atoms,
            energy=-14.0 + 0.1 * k + rng.normal(0.0, 0.01),
            forces=rng.normal(0.0, 0.3, (len(atoms), 3)),
            stress=sym + sym.T,
        ))
    return out


def assert_same_structures_and_labels(got: list[Atoms], want: list[Atoms]) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.get_chemical_symbols() == b.get_chemical_symbols()
        np.testing.assert_allclose(a.positions, b.positions, atol=POS_TOL)
        np.testing.assert_allclose(a.cell[:], b.cell[:], atol=POS_TOL)
        assert a.pbc.tolist() == b.pbc.tolist()
        la, lb = get_labels(a), get_labels(b)
        assert la.energy == pytest.approx(lb.energy, abs=1e-8)
        np.testing.assert_allclose(la.forces, lb.forces, atol=1e-8)
        assert la.stress.shape == (3, 3)
        np.testing.assert_allclose(la.stress, lb.stress, atol=1e-10)


@pytest.fixture()
def cu_extxyz(tmp_path: Path) -> tuple[Path, list[Atoms]]:
    import ase.io

    structures = labelled_cu(3, seed=1)
    path = tmp_path / "cu.extxyz"
    ase.io.write(path, structures, format="extxyz")
    return path, structures


def test_ase_extxyz_round_trip_keeps_energy_forces_stress(read_ase: Reader, cu_extxyz, tmp_path: Path) -> None:
    path, structures = cu_extxyz
    got = read_ase({"path": str(path)}, tmp_path)
    assert_same_structures_and_labels(got, structures)


def test_ase_db_file_is_read_with_labels(read_ase: Reader, tmp_path: Path) -> None:
    import ase.db

    structures = labelled_cu(3, seed=2)
    path = tmp_path / "cu.db"
    with ase.db.connect(path) as db:
        for atoms in structures:
            db.write(atoms)
    got = read_ase({"path": str(path)}, tmp_path)
    assert_same_structures_and_labels(got, structures)


@pytest.mark.parametrize(
    ("index", "expected"),
    [("0:2", [0, 1]), ("1:", [1, 2]), ("::2", [0, 2]), ("-1", [2]), (1, [1]), (":", [0, 1, 2])],
)
def test_ase_index_option_selects_frames(read_ase: Reader, cu_extxyz, tmp_path: Path, index, expected) -> None:
    path, structures = cu_extxyz
    got = read_ase({"path": str(path), "index": index}, tmp_path)
    assert isinstance(got, list)
    assert_same_structures_and_labels(got, [structures[i] for i in expected])


def test_ase_format_option_is_passed_to_ase(read_ase: Reader, cu_extxyz, tmp_path: Path) -> None:
    path, structures = cu_extxyz
    renamed = tmp_path / "cu.data"  # an extension ASE cannot guess from
    shutil.copy(path, renamed)
    got = read_ase({"path": str(renamed), "format": "extxyz"}, tmp_path)
    assert_same_structures_and_labels(got, structures)


def test_ase_paths_list_concatenates_files_in_order(read_ase: Reader, tmp_path: Path) -> None:
    import ase.db
    import ase.io

    first, second = labelled_cu(2, seed=3), labelled_cu(3, seed=4)
    ase.io.write(tmp_path / "a.extxyz", first, format="extxyz")
    with ase.db.connect(tmp_path / "b.db") as db:
        for atoms in second:
            db.write(atoms)
    got = read_ase({"paths": [str(tmp_path / "a.extxyz"), str(tmp_path / "b.db")]}, tmp_path)
    assert_same_structures_and_labels(got, first + second)
    # the index applies to every file
    got = read_ase({"paths": [str(tmp_path / "a.extxyz"), str(tmp_path / "b.db")], "index": "0"}, tmp_path)
    assert_same_structures_and_labels(got, [first[0], second[0]])


def test_ase_relative_path_resolves_against_base_dir(read_ase: Reader, cu_extxyz, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    path, structures = cu_extxyz
    sub = tmp_path / "data"
    sub.mkdir()
    shutil.move(path, sub / "cu.extxyz")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the working directory must not matter
    assert_same_structures_and_labels(read_ase({"path": "data/cu.extxyz"}, tmp_path), structures)
    assert_same_structures_and_labels(read_ase({"paths": ["data/cu.extxyz"]}, tmp_path), structures)
    assert_same_structures_and_labels(read_ase({"path": "cu.extxyz"}, sub), structures)
    # an absolute path ignores base_dir
    assert_same_structures_and_labels(read_ase({"path": str(sub / "cu.extxyz")}, elsewhere), structures)


def test_ase_missing_file_names_the_file(read_ase: Reader, cu_extxyz, tmp_path: Path) -> None:
    path, _ = cu_extxyz
    with pytest.raises(ConfigError, match="not found") as info:
        read_ase({"path": "nowhere/missing.extxyz"}, tmp_path)
    assert str(tmp_path / "nowhere" / "missing.extxyz") in str(info.value)
    # in a list, only the missing one is named
    with pytest.raises(ConfigError) as info:
        read_ase({"paths": [str(path), "gone.xyz"]}, tmp_path)
    assert "gone.xyz" in str(info.value)
    assert str(path) not in str(info.value)


def test_ase_needs_a_path(read_ase: Reader, tmp_path: Path) -> None:
    for options in ({}, {"index": ":"}, {"paths": []}, {"path": None}):
        with pytest.raises(ConfigError, match="needs 'path'.*or 'paths'"):
            read_ase(options, tmp_path)


def test_ase_base_dir_as_str_and_home_expansion(read_ase: Reader, cu_extxyz, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    path, structures = cu_extxyz
    assert_same_structures_and_labels(read_ase({"path": path.name}, str(tmp_path)), structures)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert_same_structures_and_labels(read_ase({"path": f"~/{path.name}"}, tmp_path / "x"), structures)


def test_ase_path_and_paths_together_is_an_error(read_ase: Reader, cu_extxyz, tmp_path: Path) -> None:
    path, _ = cu_extxyz
    with pytest.raises(ConfigError, match="both"):
        read_ase({"path": str(path), "paths": [str(path)]}, tmp_path)


def test_ase_unknown_option_lists_valid_options(read_ase: Reader, cu_extxyz, tmp_path: Path) -> None:
    path, _ = cu_extxyz
    options = {"path": str(path), "idx": "0:2"}
    with pytest.raises(ConfigError) as info:
        read_ase(options, tmp_path)
    message = str(info.value)
    assert "idx" in message
    for valid in ("path", "paths", "index", "format"):
        assert valid in message
    assert options == {"path": str(path), "idx": "0:2"}  # the caller's options are not consumed


def test_ase_unreadable_file_is_a_data_error_naming_the_file(read_ase: Reader, tmp_path: Path) -> None:
    bad = tmp_path / "broken.extxyz"
    bad.write_text("3\nnot an extxyz comment line\nCu 0 0\n")
    with pytest.raises(DataValidationError, match="broken.extxyz"):
        read_ase({"path": str(bad)}, tmp_path)


def test_ase_labels_are_accepted_by_graph_dataset(read_ase: Reader, cu_extxyz, tmp_path: Path) -> None:
    path, structures = cu_extxyz
    dataset = GraphDataset(read_ase({"path": str(path)}, tmp_path), cutoff=3.0, require=("energy", "forces"))
    assert len(dataset) == len(structures)
    for graph, atoms in zip(dataset.graphs, structures):
        labels = get_labels(atoms)
        assert graph[K.ENERGY].item() == pytest.approx(labels.energy, rel=1e-6)
        np.testing.assert_allclose(graph[K.FORCES].numpy(), labels.forces, atol=1e-6)
        np.testing.assert_allclose(graph[K.STRESS].numpy()[0], labels.stress, atol=1e-6)


# --------------------------------------------------------------------------------------------
# pymatgen source: CIF, POSCAR, Structure JSON
# --------------------------------------------------------------------------------------------


def pmg_structure():
    """A triclinic, two-species, four-site structure in pymatgen's standard lattice orientation
    (CIF stores only lattice parameters, so only that orientation survives a CIF round trip)."""
    from pymatgen.core import Lattice, Structure

    lattice = Lattice.from_parameters(4.1, 4.3, 4.6, 84.0, 95.0, 101.0)
    return Structure(
        lattice,
        ["Na", "Cl", "Na", "Cl"],
        [[0.01, 0.02, 0.03], [0.52, 0.49, 0.51], [0.0, 0.5, 0.5], [0.5, 0.03, 0.97]],
    )


def assert_matches_pymatgen(atoms: Atoms, structure, *, any_order: bool = False) -> None:
    """Same cell, species and Cartesian positions (Å); ``any_order`` for CIF, which pymatgen's
    CifParser reads back grouped by species."""
    symbols = np.array(atoms.get_chemical_symbols())
    want_symbols = np.array([site.specie.symbol for site in structure])
    positions, want_positions = atoms.positions, structure.cart_coords
    if any_order:
        mine = np.lexsort((*positions.T, symbols))
        theirs = np.lexsort((*want_positions.T, want_symbols))
        symbols, positions = symbols[mine], positions[mine]
        want_symbols, want_positions = want_symbols[theirs], want_positions[theirs]
    assert symbols.tolist() == want_symbols.tolist()
    np.testing.assert_allclose(atoms.cell[:], structure.lattice.matrix, atol=POS_TOL)
    np.testing.assert_allclose(positions, want_positions, atol=POS_TOL)
    assert atoms.pbc.all()
    assert get_labels(atoms) == get_labels(Atoms())  # no labels: all None


@pytest.mark.parametrize("filename", ["NaCl.cif", "POSCAR", "CONTCAR", "NaCl.json", "nacl_structure.json"])
def test_pymatgen_structure_files_round_trip(read_pymatgen: Reader, tmp_path: Path, filename: str) -> None:
    structure = pmg_structure()
    structure.to(filename=str(tmp_path / filename))
    got = read_pymatgen({"path": filename}, tmp_path)  # relative to base_dir
    assert len(got) == 1
    assert_matches_pymatgen(got[0], structure, any_order=filename.endswith(".cif"))


def test_pymatgen_paths_list_and_missing_file(read_pymatgen: Reader, tmp_path: Path) -> None:
    structure = pmg_structure()
    structure.to(filename=str(tmp_path / "a.cif"))
    structure.to(filename=str(tmp_path / "POSCAR"))
    got = read_pymatgen({"paths": ["a.cif", str(tmp_path / "POSCAR")]}, tmp_path)
    assert len(got) == 2
    assert_matches_pymatgen(got[0], structure, any_order=True)
    assert_matches_pymatgen(got[1], structure)
    with pytest.raises(ConfigError, match="not found") as info:
        read_pymatgen({"paths": ["a.cif", "b.cif"]}, tmp_path)
    assert str(tmp_path / "b.cif") in str(info.value)


def test_pymatgen_unknown_option_lists_valid_options(read_pymatgen: Reader, tmp_path: Path) -> None:
    pmg_structure().to(filename=str(tmp_path / "POSCAR"))
    with pytest.raises(ConfigError) as info:
        read_pymatgen({"path": "POSCAR", "index": ":"}, tmp_path)
    message = str(info.value)
    assert "index" in message and "path" in message and "paths" in message


def test_pymatgen_unreadable_file_is_a_data_error_naming_the_file(read_pymatgen: Reader, tmp_path: Path) -> None:
    bad = tmp_path / "junk.cif"
    bad.write_text("this is not a CIF file\n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pymatgen warns before it fails
        with pytest.raises(DataValidationError, match="junk.cif"):
            read_pymatgen({"path": str(bad)}, tmp_path)


# --------------------------------------------------------------------------------------------
# pymatgen source: vasprun.xml
# --------------------------------------------------------------------------------------------


def _varray(name: str, rows: Any, indent: str = "  ") -> str:
    body = "".join(f"{indent} <v>{' '.join(f'{x:18.10f}' for x in row)} </v>\n" for row in np.atleast_2d(rows))
    return f'{indent}<varray name="{name}" >\n{body}{indent}</varray>\n'


def _structure_xml(cell: np.ndarray, frac: np.ndarray, name: str | None = None) -> str:
    attr = f' name="{name}"' if name else ""
    return (
        f"<structure{attr}>\n <crystal>\n"
        + _varray("basis", cell)
        + f'  <i name="volume">{abs(np.linalg.det(cell)):18.10f} </i>\n'
        + _varray("rec_basis", np.linalg.inv(cell).T)
        + " </crystal>\n"
        + _varray("positions", frac, indent=" ")
        + "</structure>\n"
    )


def _energy_xml(energy: float, indent: str) -> str:
    lines = [f'{indent}<energy>\n']
    for name in ("e_fr_energy", "e_wo_entrp", "e_0_energy"):
        lines.append(f'{indent} <i name="{name}">{energy:18.8f} </i>\n')
    lines.append(f"{indent}</energy>\n")
    return "".join(lines)


def write_vasprun(path: Path, symbols: list[str], cell: np.ndarray, steps: list[dict[str, Any]]) -> None:
    """Write a minimal vasprun.xml for a relaxation (IBRION=2, NSW=10) at fixed ``cell``.

    Each step gives ``frac`` (fractional positions), ``energy`` (eV, written as e_fr_energy,
    e_wo_entrp and e_0_energy), ``forces`` (eV/Å) and ``stress`` (kBar, VASP sign). The file has
    the sections pymatgen's ``Vasprun`` reads unconditionally (generator, incar, kpoints,
    parameters with NELM/NSW/IBRION, atominfo, initialpos, one <calculation> with one <scstep>
    per ionic step, finalpos), so the run also parses as converged (no warning).
    """
    cell = np.asarray(cell, dtype=float)
    species = list(dict.fromkeys(symbols))
    atom_rows = "".join(f"    <rc><c>{s}</c><c>{species.index(s) + 1}</c></rc>\n" for s in symbols)
    type_rows = "".join(
        f"    <rc><c>{symbols.count(s)}</c><c>{s}</c><c>1.0</c><c>1.0</c><c>  PAW_PBE {s} 22Jun2005</c></rc>\n"
        for s in species
    )
    parts = [
        '<?xml version="1.0" encoding="ISO-8859-1"?>\n<modeling>\n',
        ' <generator>\n  <i name="program" type="string">vasp </i>\n'
        '  <i name="version" type="string">6.3.2 </i>\n </generator>\n',
        ' <incar>\n  <i type="string" name="PREC">accurate</i>\n  <i type="int" name="IBRION">2</i>\n'
        '  <i type="int" name="NSW">10</i>\n </incar>\n',
        ' <kpoints>\n  <generation param="Gamma">\n   <v type="int" name="divisions">1 1 1 </v>\n'
        '   <v name="usershift">0 0 0 </v>\n  </generation>\n'
        '  <varray name="kpointlist" >\n   <v>0.0 0.0 0.0 </v>\n  </varray>\n'
        '  <varray name="weights" >\n   <v>1.0 </v>\n  </varray>\n </kpoints>\n',
        ' <parameters>\n  <separator name="electronic" >\n   <i type="int" name="NELM">60</i>\n  </separator>\n'
        '  <separator name="ionic" >\n   <i type="int" name="NSW">10</i>\n   <i type="int" name="IBRION">2</i>\n'
        '   <i name="EDIFFG">-0.01</i>\n  </separator>\n </parameters>\n',
        f" <atominfo>\n  <atoms>{len(symbols)}</atoms>\n  <types>{len(species)}</types>\n"
        '  <array name="atoms" >\n   <dimension dim="1">ion</dimension>\n   <field type="string">element</field>\n'
        f'   <field type="int">atomtype</field>\n   <set>\n{atom_rows}   </set>\n  </array>\n'
        '  <array name="atomtypes" >\n   <dimension dim="1">type</dimension>\n   <field type="int">atomspertype</field>\n'
        '   <field type="string">element</field>\n   <field>mass</field>\n   <field>valence</field>\n'
        f'   <field type="string">pseudopotential</field>\n   <set>\n{type_rows}   </set>\n  </array>\n </atominfo>\n',
        _structure_xml(cell, np.asarray(steps[0]["frac"]), "initialpos"),
    ]
    for step in steps:
        parts.append(
            " <calculation>\n  <scstep>\n"
            + _energy_xml(step["energy"], "   ")
            + "  </scstep>\n"
            + _structure_xml(cell, np.asarray(step["frac"]))
            + _varray("forces", step["forces"])
            + _varray("stress", step["stress"])
            + _energy_xml(step["energy"], "  ")
            + " </calculation>\n"
        )
    parts.append(_structure_xml(cell, np.asarray(steps[-1]["frac"]), "finalpos"))
    parts.append("</modeling>\n")
    path.write_text("".join(parts), encoding="ascii")


CU_CELL = np.array([[2.55, 0.0, 0.0], [0.10, 2.56, 0.0], [0.0, 0.05, 3.61]])  # 2-atom bct Cu, slightly sheared
CU_STEPS = [
    {
        "frac": [[0.0, 0.0, 0.0], [0.5 + 0.010 * k, 0.5 - 0.005 * k, 0.5 + 0.020 * k]],
        "energy": -7.25 + 0.0123 * k * k,
        "forces": [[0.10 * k + 0.01, -0.20, 0.30 - 0.05 * k], [-0.10 * k - 0.01, 0.20, -0.30 + 0.05 * k]],
        # kBar, VASP sign (positive = compressive); symmetric like VASP's
        "stress": [[12.5 - 3.0 * k, 1.25, -0.5], [1.25, -4.0 + k, 2.0 * k], [-0.5, 2.0 * k, 3.75]],
    }
    for k in range(3)
]


@pytest.fixture()
def cu_vasprun(tmp_path: Path) -> Path:
    path = tmp_path / "relax" / "vasprun.xml"
    path.parent.mkdir()
    write_vasprun(path, ["Cu", "Cu"], CU_CELL, CU_STEPS)
    return path


def test_vasprun_fixture_is_accepted_by_pymatgen_and_ase(cu_vasprun: Path) -> None:
    """The hand-made file is a valid vasprun.xml for both independent parsers."""
    import ase.io
    from pymatgen.io.vasp import Vasprun

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. no UnconvergedVASPWarning
        run = Vasprun(str(cu_vasprun), parse_dos=False, parse_eigen=False, parse_potcar_file=False)
    assert run.converged
    assert len(run.ionic_steps) == len(CU_STEPS)
    for step, want in zip(run.ionic_steps, CU_STEPS):
        assert step["e_fr_energy"] == pytest.approx(want["energy"])
        np.testing.assert_allclose(step["forces"], want["forces"])
        np.testing.assert_allclose(step["stress"], want["stress"])
        np.testing.assert_allclose(step["structure"].frac_coords, want["frac"], atol=1e-9)
    frames = ase.io.read(cu_vasprun, index=":", format="vasp-xml")
    assert len(frames) == len(CU_STEPS)


def expected_ase_stress(kbar: Any) -> np.ndarray:
    """VASP kBar (positive = compressive) to ASE eV/Å³ (positive = tensile): 1 kBar = 0.1 GPa."""
    return -0.1 * GPa * np.asarray(kbar, dtype=float)


def assert_vasprun_frames(frames: list[Atoms], steps: list[dict[str, Any]]) -> None:
    assert len(frames) == len(steps)
    for atoms, step in zip(frames, steps):
        assert atoms.get_chemical_symbols() == ["Cu", "Cu"]
        assert atoms.pbc.all()
        np.testing.assert_allclose(atoms.cell[:], CU_CELL, atol=POS_TOL)
        np.testing.assert_allclose(atoms.positions, np.asarray(step["frac"]) @ CU_CELL, atol=POS_TOL)
        labels = get_labels(atoms)
        assert labels.energy == pytest.approx(step["energy"], abs=1e-8)
        np.testing.assert_allclose(labels.forces, step["forces"], atol=1e-8)
        np.testing.assert_allclose(labels.stress, expected_ase_stress(step["stress"]), rtol=1e-10, atol=1e-14)


def test_vasprun_gives_every_ionic_step_with_labels(read_pymatgen: Reader, cu_vasprun: Path) -> None:
    frames = read_pymatgen({"path": "relax/vasprun.xml"}, cu_vasprun.parent.parent)
    assert_vasprun_frames(frames, CU_STEPS)
    # spot-check the units and sign by hand: 12.5 kBar of compressive xx stress in step 0
    assert get_labels(frames[0]).stress[0, 0] == pytest.approx(-12.5 * 0.1 * GPa)
    assert get_labels(frames[0]).stress[0, 0] == pytest.approx(-12.5 * 6.241509074e-4, rel=1e-8)


def test_vasprun_labels_agree_with_ase_vasp_xml_reader(read_pymatgen: Reader, cu_vasprun: Path) -> None:
    """ASE's own vasprun reader (independent code) gives the same energies, forces and stress."""
    import ase.io

    ours = read_pymatgen({"path": str(cu_vasprun)}, cu_vasprun.parent)
    theirs = ase.io.read(cu_vasprun, index=":", format="vasp-xml")
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_allclose(a.positions, b.positions, atol=POS_TOL)
        la = get_labels(a)
        assert la.energy == pytest.approx(b.get_potential_energy(force_consistent=True))
        np.testing.assert_allclose(la.forces, b.get_forces(), atol=1e-10)
        np.testing.assert_allclose(la.stress, b.get_stress(voigt=False), atol=1e-12)


@pytest.mark.parametrize("name", ["vasprun.xml.gz", "vasprun.relax2.xml", "vasprun.xml.relax1", "vasprun.xml.relax1.gz"])
def test_vasprun_file_name_variants(read_pymatgen: Reader, cu_vasprun: Path, name: str) -> None:
    """Compressed and custodian-style names (vasprun.xml.relax1.gz) still give every labelled step."""
    target = cu_vasprun.parent / name
    if name.endswith(".gz"):
        with open(cu_vasprun, "rb") as src, gzip.open(target, "wb") as dst:
            shutil.copyfileobj(src, dst)
    else:
        shutil.copy(cu_vasprun, target)
    assert_vasprun_frames(read_pymatgen({"path": name}, cu_vasprun.parent), CU_STEPS)


def test_vasprun_mixed_with_structure_files(read_pymatgen: Reader, cu_vasprun: Path) -> None:
    pmg_structure().to(filename=str(cu_vasprun.parent / "POSCAR"))
    got = read_pymatgen({"paths": ["POSCAR", "vasprun.xml"]}, cu_vasprun.parent)
    assert len(got) == 1 + len(CU_STEPS)
    assert_matches_pymatgen(got[0], pmg_structure())
    assert_vasprun_frames(got[1:], CU_STEPS)


def test_vasprun_without_stress_gives_no_stress_label(read_pymatgen: Reader, tmp_path: Path) -> None:
    path = tmp_path / "vasprun.xml"
    write_vasprun(path, ["Cu", "Cu"], CU_CELL, CU_STEPS)
    text = path.read_text()
    start = text.index('<varray name="stress"')
    while start >= 0:  # drop every stress block
        end = text.index("</varray>", start) + len("</varray>\n")
        text = text[:start].rstrip(" ") + text[end:]
        start = text.find('<varray name="stress"')
    path.write_text(text)
    frames = read_pymatgen({"path": str(path)}, tmp_path)
    assert len(frames) == len(CU_STEPS)
    for atoms, step in zip(frames, CU_STEPS):
        labels = get_labels(atoms)
        assert labels.stress is None
        assert labels.energy == pytest.approx(step["energy"])
        np.testing.assert_allclose(labels.forces, step["forces"])


def test_malformed_vasprun_is_a_data_error_naming_the_file(read_pymatgen: Reader, cu_vasprun: Path) -> None:
    text = cu_vasprun.read_text()
    cu_vasprun.write_text(text[: len(text) // 2])  # truncated run
    with pytest.raises(DataValidationError, match="vasprun.xml"):
        read_pymatgen({"path": str(cu_vasprun)}, cu_vasprun.parent)


def test_vasprun_without_ionic_steps_is_a_data_error(read_pymatgen: Reader, cu_vasprun: Path) -> None:
    """No <calculation> blocks: pymatgen fails on a plain run; on an ML_LMLFF run it parses with
    no ionic steps, which must not silently give zero structures."""
    text = cu_vasprun.read_text()
    start, end = text.index(" <calculation>"), text.rindex("</calculation>\n") + len("</calculation>\n")
    no_steps = text[:start] + text[end:]
    cu_vasprun.write_text(no_steps)
    with pytest.raises(DataValidationError, match="vasprun.xml"):
        read_pymatgen({"path": str(cu_vasprun)}, cu_vasprun.parent)
    ml_run = no_steps.replace(" <incar>\n", ' <incar>\n  <i type="logical" name="ML_LMLFF"> T  </i>\n', 1)
    assert ml_run != no_steps
    cu_vasprun.write_text(ml_run)
    with pytest.raises(DataValidationError, match="no ionic steps"):
        read_pymatgen({"path": str(cu_vasprun)}, cu_vasprun.parent)


def test_vasprun_labels_are_accepted_by_graph_dataset(read_pymatgen: Reader, cu_vasprun: Path) -> None:
    frames = read_pymatgen({"path": str(cu_vasprun)}, cu_vasprun.parent)
    dataset = GraphDataset(frames, cutoff=3.0, require=("energy", "forces"))
    assert len(dataset) == len(CU_STEPS)
    for graph, step in zip(dataset.graphs, CU_STEPS):
        assert graph[K.ENERGY].item() == pytest.approx(step["energy"], rel=1e-6)
        np.testing.assert_allclose(graph[K.FORCES].numpy(), step["forces"], atol=1e-6)
        np.testing.assert_allclose(graph[K.STRESS].numpy()[0], expected_ase_stress(step["stress"]), atol=1e-7)
        assert graph[K.EDGE_INDEX].shape[1] > 0  # 2.55 Å Cu-Cu contacts are inside the 3 Å cutoff
    # structure files carry no labels, so a loss that needs them is refused with a clear error
    with pytest.raises(DataValidationError, match="needs a 'energy' label"):
        GraphDataset([Atoms("Cu", cell=[2.5] * 3, pbc=True)], cutoff=3.0, require=("energy", "forces"))


def test_vasprun_frames_logic_with_a_fake_parser(read_pymatgen: Reader, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """``_vasprun_frames`` on its own: e_fr_energy (not e_0_energy) is the energy label, stress is
    optional per step, and the parser is asked not to read DOS, eigenvalues or POTCARs."""
    import pymatgen.io.vasp
    from pymatgen.core import Lattice, Structure

    calls: list[tuple[str, dict]] = []
    structure = Structure(Lattice(CU_CELL), ["Cu", "Cu"], CU_STEPS[0]["frac"])

    class FakeVasprun:
        def __init__(self, filename: str, **kwargs: Any) -> None:
            calls.append((filename, kwargs))
            self.ionic_steps = [
                {"structure": structure, "e_fr_energy": -1.5, "e_0_energy": -1.4, "forces": np.ones((2, 3)),
                 "stress": np.diag([10.0, 20.0, 30.0])},
                {"structure": structure, "e_fr_energy": -1.6, "e_0_energy": -1.3, "forces": np.zeros((2, 3))},
            ]

    monkeypatch.setattr(pymatgen.io.vasp, "Vasprun", FakeVasprun)
    path = tmp_path / "vasprun.xml"
    path.write_text("<modeling/>")
    frames = read_pymatgen({"path": str(path)}, tmp_path)
    assert calls == [(str(path), {"parse_dos": False, "parse_eigen": False, "parse_potcar_file": False})]
    first, second = (get_labels(a) for a in frames)
    assert (first.energy, second.energy) == (-1.5, -1.6)
    np.testing.assert_allclose(first.stress, np.diag([-1.0, -2.0, -3.0]) * GPa)
    assert second.stress is None
    np.testing.assert_allclose(second.forces, np.zeros((2, 3)))


def test_ase_db_keeps_per_structure_metadata(tmp_path) -> None:
    import ase.db

    from atomforge import GraphDataset, attach_labels, collate, get_labels, keys as K, make_registry
    from conftest import cu_structures

    a, b = cu_structures(2, seed=4)
    labels = get_labels(a)
    a.set_initial_charges([-1.0] + [0.0] * (len(a) - 1))  # ASE db derives its 'charge' from these
    a = attach_labels(a, energy=labels.energy, forces=labels.forces, stress=labels.stress)
    with ase.db.connect(tmp_path / "meta.db") as db:
        db.write(a, spin=2, fidelity=1, weight=0.25)
        db.write(b)
    read = make_registry().get("data_sources", "ase").factory({"path": "meta.db"}, tmp_path)
    assert get_labels(read[0]).energy == pytest.approx(get_labels(a).energy)
    batch = collate(GraphDataset(read, 3.0).graphs)
    assert batch[K.CHARGE].tolist() == [-1.0, 0.0] and batch[K.WEIGHT].tolist() == [0.25, 1.0]
    assert batch[K.FIDELITY].tolist() == [1, 0] and batch[K.SPIN].tolist() == [2.0, 0.0]
    only_second = make_registry().get("data_sources", "ase").factory({"path": "meta.db", "index": "-1"}, tmp_path)
    assert len(only_second) == 1 and only_second[0].info.get("weight") is None
