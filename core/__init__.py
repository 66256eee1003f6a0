"""atomforge: machine-learned interatomic potentials built like foundation models.

Public API; see ``docs/architecture.md`` for the picture and ``docs/plugins.md`` for writing
plugins.
"""

from __future__ import annotations

from . import keys
from ._errors import (
    AtomforgeError,
    ConfigError,
    ConformanceError,
    DataValidationError,
    DuplicatePluginError,
    ModelFileError,
    PluginError,
    UnknownPluginError,
    UnseenElementError,
)
from ._specs import (
    BackboneSpec,
    CommandSpec,
    DataSourceSpec,
    EngineSpec,
    ExplorerSpec,
    LossSpec,
    OracleSpec,
    PluginKind,
    SelectorSpec,
    TrackerSpec,
    UQHeadSpec,
)
from .calculator import AtomforgeCalculator, load_calculator
from .config import RunConfig, config_from_dict, load_config
from .data import Labels, Metadata, attach_labels, get_labels, get_metadata, validate_structure
from .evaluate import evaluate, parity_plot
from .graph import GraphDataset, atoms_to_graph, collate, iterate_batches, neighbor_list
from .hookspecs import hookimpl, hookspec
from .losses import Augmentation, CompositeLoss, LossTerm, WeightedTerm
from .modelfile import build_potential, load_model, read_model_file, save_model
from .oracle import CalculatorOracle, LabelResult, Oracle, OracleFailure, OracleTimeout, label_safely
from .potential import Backbone, Potential, fit_normalization
from .registry import DEFAULT_PLUGINS, PluginLoadWarning, Registry, make_plugin_manager, make_registry
from .tracking import Tracker
from .training import TorchEngine, TrainResult, TrainSettings
from .uncertainty import UQFitContext, UQHead, calibrate, evaluate_uncertainty

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "keys",
    # errors
    "AtomforgeError", "ConfigError", "ConformanceError", "DataValidationError",
    "DuplicatePluginError", "ModelFileError", "PluginError", "UnknownPluginError",
    "UnseenElementError",
    # plugins
    "hookimpl", "hookspec", "PluginKind", "BackboneSpec", "CommandSpec", "DataSourceSpec",
    "EngineSpec", "ExplorerSpec", "LossSpec", "OracleSpec", "SelectorSpec", "TrackerSpec",
    "UQHeadSpec", "DEFAULT_PLUGINS", "PluginLoadWarning", "Registry", "make_plugin_manager",
    "make_registry",
    # data
    "Labels", "Metadata", "attach_labels", "get_labels", "get_metadata", "validate_structure",
    "GraphDataset", "atoms_to_graph", "collate", "iterate_batches", "neighbor_list",
    # models
    "Backbone", "Potential", "fit_normalization", "build_potential", "load_model",
    "read_model_file", "save_model", "AtomforgeCalculator", "load_calculator",
    # training
    "Augmentation", "CompositeLoss", "LossTerm", "WeightedTerm", "TorchEngine", "TrainResult", "TrainSettings",
    "RunConfig", "config_from_dict", "load_config", "evaluate", "parity_plot",
    # uncertainty
    "UQHead", "UQFitContext", "calibrate", "evaluate_uncertainty",
    # oracles, tracking
    "CalculatorOracle", "Oracle", "OracleFailure", "OracleTimeout", "LabelResult", "label_safely", "Tracker",
]
