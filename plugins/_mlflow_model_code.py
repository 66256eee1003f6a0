"""The atomforge model as MLflow serves it ("models from code": MLflow runs this file to build
the model, so no pickled object travels with it). Logged by ``_mlflow_model.log_pyfunc_model``;
never imported by atomforge itself.

Input: a ``pandas.DataFrame`` with a column ``structure``, one structure per row as extended-XYZ
text. Output: a ``DataFrame`` with ``energy`` (eV), ``forces`` ([N][3], eV/Å) and ``stress``
(Voigt, eV/Å³; an empty list unless periodic in all three directions), computed by the atomforge
ASE calculator of the model file logged as artifact ``model_file``.
"""

import io
import warnings

from mlflow.models import set_model

from atomforge import load_calculator

INPUT_COLUMN = "structure"
ARTIFACT = "model_file"

with warnings.catch_warnings():  # MLflow warns that predict() has no type hints: the signature is explicit
    warnings.showwarning = lambda *args, **kwargs: None  # MLflow resets the filters inside; restored on exit
    from mlflow.pyfunc import PythonModel

    class AtomforgePyfunc(PythonModel):
        """Energies, forces and stress of structures from an atomforge model file."""

        def load_context(self, context):  # noqa: ANN001, ANN201 - MLflow would read type hints as a schema
            self.calculator = load_calculator(context.artifacts[ARTIFACT])

        def predict(self, context, model_input, params=None):  # noqa: ANN001, ANN201 - see load_context
            import pandas as pd
            from ase.io import read

            texts = model_input[INPUT_COLUMN] if hasattr(model_input, "columns") else model_input
            energies, forces, stresses = [], [], []
            for text in texts:
                atoms = read(io.StringIO(str(text)), format="extxyz")
                atoms.calc = self.calculator
                energies.append(float(atoms.get_potential_energy()))
                forces.append(atoms.get_forces().tolist())
                stresses.append(atoms.get_stress(voigt=True).tolist() if atoms.pbc.all() else [])
            return pd.DataFrame({"energy": energies, "forces": forces, "stress": stresses})


set_model(AtomforgePyfunc())
