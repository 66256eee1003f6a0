"""Logging an atomforge model file as an MLflow model (``pyfunc`` flavour; the served class is in
``_mlflow_model_code.py``), used by the ``mlflow`` tracker.

Why a ``PythonModel`` and not ``mlflow.pytorch``: the pytorch flavour exports the network with
``torch.export`` and needs a fixed input example, while an interatomic potential takes
structures of any size and computes forces by autograd. Wrapping the model file itself keeps
one source of truth (``model.pt``, weights-only) and serves exactly what the atomforge ASE
calculator computes.

Input: a ``pandas.DataFrame`` with one column ``structure``: each row one structure written as
extended XYZ text (``ase.io.write(buffer, atoms, format="extxyz")``; see :func:`structures_frame`).
Output: a ``DataFrame`` with, per row, ``energy`` (eV), ``forces`` ([N][3], eV/Å) and
``stress`` (Voigt ``[xx, yy, zz, yz, xz, xy]``, eV/Å³, ASE's sign; an empty list unless all three
directions are periodic).
"""

from __future__ import annotations

import contextlib
import io
import os
import time
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

__all__ = ["structures_frame", "model_signature", "log_pyfunc_model", "INPUT_COLUMN", "CODE_FILE"]

INPUT_COLUMN = "structure"  # the input column: one extended-XYZ text per row (as in _mlflow_model_code.py)
ARTIFACT = "model_file"  # the artifact key under which the model file travels (as in _mlflow_model_code.py)
MODEL_TYPE = "atomforge-potential"  # the LoggedModel's model_type (search_logged_models can filter on it)
_PROGRESS_BAR = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
CODE_FILE = Path(__file__).with_name("_mlflow_model_code.py")  # the served class; MLflow "model from code": no pickle


def structures_frame(structures: Sequence[Any]) -> Any:
    """The model's input for ``structures`` (``ase.Atoms``): one extended-XYZ text per row."""
    import pandas as pd
    from ase import Atoms
    from ase.io import write

    rows = []
    for atoms in structures:
        buffer = io.StringIO()
        plain = Atoms(atoms.numbers, atoms.positions, cell=atoms.cell, pbc=atoms.pbc)  # labels are not inputs
        write(buffer, plain, format="extxyz")
        rows.append(buffer.getvalue())
    return pd.DataFrame({INPUT_COLUMN: rows})


def model_signature() -> Any:
    """The MLflow signature of the input and output described in the module docstring."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, Schema

    inputs = Schema([ColSpec("string", INPUT_COLUMN)])
    outputs = Schema([ColSpec("double", "energy"), ColSpec(Array(Array("double")), "forces"),
                      ColSpec(Array("double"), "stress")])
    return ModelSignature(inputs=inputs, outputs=outputs)


def pip_requirements() -> list[str]:
    """Pinned requirements of the serving environment, given explicitly so that logging never
    runs MLflow's requirement inference (which imports the model and may query package indexes)."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for name in ("atomforge", "torch", "ase", "numpy", "pandas", "mlflow"):
        try:
            out.append(f"{name}=={version(name).split('+')[0]}")
        except PackageNotFoundError:
            out.append(name)
    return out


@contextlib.contextmanager
def _using_store(tracking_uri: str) -> Iterator[None]:
    """MLflow's process-wide tracking URI set to ``tracking_uri`` inside the block and restored
    afterwards (unset included; MLflow's logging API reads only the global URI), with no
    artifact progress bars and none of the warnings about type hints and input examples (the
    signature is given explicitly). The registry follows the tracking URI unless the user set
    a registry URI of their own."""
    from mlflow.tracking._tracking_service import utils

    previous = getattr(utils, "_tracking_uri", None)  # None = not set: MLflow's default applies
    bar = os.environ.get(_PROGRESS_BAR)
    utils.set_tracking_uri(tracking_uri)
    os.environ[_PROGRESS_BAR] = "false"
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=UserWarning, module=r"mlflow\..*")
            yield
    finally:
        utils.set_tracking_uri(previous)
        if bar is None:
            os.environ.pop(_PROGRESS_BAR, None)
        else:
            os.environ[_PROGRESS_BAR] = bar


def log_pyfunc_model(client: Any, tracking_uri: str, run_id: str, model_path: Path, *, name: str = "model",
                     registered_model_name: str | None = None, tags: dict[str, str] | None = None) -> Any:
    """Log ``model_path`` as an MLflow model of run ``run_id`` in the store ``tracking_uri``
    (a LoggedModel in the run's experiment, carrying the run's params, found by
    ``search_logged_models``), registered as ``registered_model_name`` if given; returns
    MLflow's ``ModelInfo``. The seconds it took are logged as metric ``mlflow_model_log_s``."""
    from mlflow.models import Model
    import mlflow.pyfunc

    started = time.perf_counter()
    run = client.get_run(run_id)
    logged = client.create_logged_model(run.info.experiment_id, name=name, source_run_id=run_id,
                                        params=dict(run.data.params), tags=tags, model_type=MODEL_TYPE)
    with _using_store(tracking_uri):
        info = Model.log(artifact_path=None, name=name, flavor=mlflow.pyfunc, run_id=run_id, model_id=logged.model_id,
                         python_model=str(CODE_FILE), artifacts={ARTIFACT: str(model_path)},
                         signature=model_signature(), pip_requirements=pip_requirements(),
                         registered_model_name=registered_model_name, await_registration_for=0)
    client.log_metric(run_id, "mlflow_model_log_s", time.perf_counter() - started)
    return info
