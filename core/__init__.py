"""atomforge: machine-learned interatomic potentials built like foundation models.

This module is the public API — everything a user script or a plugin needs is importable from
``atomforge`` directly (``from atomforge import Potential, BackboneSpec, hookimpl``), plus the
public modules ``atomforge.keys`` (batch keys), ``atomforge.distributed`` (rank helpers) and
``atomforge.testing`` (conformance kits). Plugins in ``plugins/`` import nothing else
(``tests/test_public_api.py`` checks it). See ``docs/plugins.md`` for the plugin surface,
grouped as below, and ``docs/architecture.md`` for the picture.
"""

from __future__ import annotations

from . import distributed, keys
from ._errors import (
    AtomforgeError,
    ConfigError,
    ConformanceError,
    DataValidationError,
    DuplicatePluginError,
    ExportError,
    ModelFileError,
    StoreError,
    ModelOutputError,
    PluginError,
    TrainingDivergedError,
    UnknownPluginError,
    UnseenElementError,
)
from ._io import append_durably, atomic_save, read_json, write_json_atomic, write_text_atomic
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
from .analysis.calibration import calibrate
from .analysis.evaluate import evaluate, evaluate_uncertainty, uncertainty_metrics
from .analysis.metrics import ErrorAccumulator, UQAccumulator
from .analysis.physics import model_curl, random_rotations, rotate_batch
from .analysis.plots import calibration_plot, error_vs_uncertainty_plot, parity_plot, pyplot, save_figure
from .analysis.stability import StabilityConfig, run_stability_suite, stability_config_from_dict, stability_verdict
from .config import RunConfig, SourceConfig, apply_overrides, config_from_dict, load_config, read_yaml
from .data.fields import (
    DEFAULT_FIELDS,
    FieldKind,
    FieldSpec,
    FieldTable,
    collate,
    label_mask,
    mask_key,
    replicate_batch,
    split_batch,
)
from .data.graph import DataStatistics, GraphDataset, atoms_to_graph, data_statistics, iterate_batches, neighbor_list
from .data.store import StoreWriter, StructureStore
from .data.streaming import MixedDataset, StoreDataset, StoreStructures, dataset_edges, dataset_sizes, size_batches
from .data.structures import (
    LabelKeys,
    Labels,
    Metadata,
    attach_labels,
    complete_extxyz_length,
    get_labels,
    get_metadata,
    relabel,
    validate_structure,
)
from .devices import autocast_context, cast_outputs, resolve_device
from .exploration.flagging import UncertaintyFlagger, read_candidates
from .exploration.oracle import (
    CalculatorOracle,
    LabelResult,
    Oracle,
    OracleFailure,
    OracleTimeout,
    check_label_result,
    label_safely,
)
from .exploration.records import (
    Candidate,
    Explorer,
    Selection,
    Selector,
    min_distance_ratio,
    structure_hash,
    uncertainty_of,
    unphysical_reason,
)
from .hookspecs import hookimpl, hookspec
from .model.calculator import AtomforgeCalculator, load_calculator
from .model.export import ExportedCalculator, ExportFormat, ExportReport, export_model, load_exported, read_export_info
from .model.modelfile import build_potential, load_model, read_model_file, save_model
from .model.torchsim import torchsim_available, torchsim_model
from .model.potential import (
    Backbone,
    Potential,
    differentiable_inputs,
    energy_derivatives,
    fit_normalization,
    scatter_sum,
)
from .model.uncertainty import UQFitContext, UQHead, member_statistics
from .registry import DEFAULT_PLUGINS, PluginLoadWarning, Registry, make_plugin_manager, make_registry
from .tracking import Tracker, TrackerCallback, flatten
from .training.backends import Step, TorchBackend, TrainingBackend, swapped_weights
from .training.loop import (
    Callback,
    EpochRecord,
    Trainer,
    TrainResult,
    TrainSettings,
    has_checkpoint,
    read_training_state,
)
from .training.losses import Augmentation, CompositeLoss, LossTerm, WeightedTerm, label_weights
from .training.optim import make_optimizer, make_scheduler
from .workflows.relax import RelaxResult, relax
from .workflows.train import TrainOutcome, check_config, train
from .analysis.hessian import (HESSIAN_INDEX, HESSIAN_ROWS, attach_hessian_rows, fd_hessian_rows, hessian_rows,
                               pick_rows, read_hessian_rows)
from .workflows.distill import DistillConfig, DistillOutcome, distill, distill_config_from_dict, load_distill_config
from .analysis.scaling import PowerLawFit, compute_frontier, fit_power_law, plot_scaling
from .workflows.sweep import (SweepConfig, SweepOutcome, load_sweep_config, run_sweep, sweep_config_from_dict,
                              sweep_report_only)

__version__ = "0.2.0"

__all__ = [
    "__version__",
    # public modules
    "keys", "distributed",
    # errors
    "AtomforgeError", "ConfigError", "ConformanceError", "DataValidationError",
    "DuplicatePluginError", "StoreError", "ExportError", "ModelFileError", "ModelOutputError", "PluginError", "TrainingDivergedError",
    "UnknownPluginError", "UnseenElementError",
    # the plugin system: markers, spec records, registry
    "hookimpl", "hookspec", "PluginKind", "BackboneSpec", "CommandSpec", "DataSourceSpec",
    "EngineSpec", "ExplorerSpec", "FieldSpec", "LossSpec", "OracleSpec", "SelectorSpec", "TrackerSpec",
    "UQHeadSpec", "DEFAULT_PLUGINS", "PluginLoadWarning", "Registry", "make_plugin_manager",
    "make_registry",
    # data: structures, labels, fields, graphs, batches
    "Labels", "Metadata", "attach_labels", "get_labels", "get_metadata", "validate_structure", "LabelKeys", "relabel",
    "complete_extxyz_length", "FieldKind", "FieldTable", "DEFAULT_FIELDS", "GraphDataset", "DataStatistics", "data_statistics", "atoms_to_graph",
    "collate", "replicate_batch", "split_batch", "label_mask", "mask_key", "iterate_batches", "neighbor_list",
    # data: the structure store and streaming
    "StructureStore", "StoreWriter", "StoreStructures", "StoreDataset", "MixedDataset", "size_batches", "dataset_sizes", "dataset_edges",
    # models: backbones, the Potential, model files, calculator
    "Backbone", "Potential", "differentiable_inputs", "energy_derivatives", "scatter_sum", "fit_normalization",
    "build_potential", "load_model", "read_model_file", "save_model", "AtomforgeCalculator", "load_calculator",
    # deployment: exported models (docs/deploy.md)
    "export_model", "ExportFormat", "ExportReport", "ExportedCalculator", "load_exported", "read_export_info",
    "torchsim_model", "torchsim_available",
    # losses and physics
    "Augmentation", "CompositeLoss", "LossTerm", "WeightedTerm", "label_weights", "model_curl", "random_rotations", "rotate_batch",
    # training: the loop, backends, config
    "Trainer", "TrainSettings", "TrainResult", "EpochRecord", "Callback", "TrainingBackend", "TorchBackend",
    "Step", "swapped_weights", "resolve_device", "autocast_context", "cast_outputs", "make_optimizer", "make_scheduler",
    "has_checkpoint", "read_training_state", "RunConfig", "SourceConfig", "config_from_dict", "load_config",
    "apply_overrides", "read_yaml", "check_config", "train", "TrainOutcome",
    # geometry optimisation (atomforge relax)
    "relax", "RelaxResult",
    "HESSIAN_ROWS", "HESSIAN_INDEX", "hessian_rows", "fd_hessian_rows", "pick_rows", "attach_hessian_rows",
    "read_hessian_rows",
    "distill", "DistillConfig", "DistillOutcome", "distill_config_from_dict", "load_distill_config",
    # scaling sweeps and scaling-law fits (docs/sweep.md)
    "run_sweep", "SweepConfig", "SweepOutcome", "sweep_config_from_dict", "load_sweep_config", "sweep_report_only",
    "fit_power_law", "PowerLawFit", "compute_frontier", "plot_scaling",
    # evaluation, metrics, plots
    "evaluate", "evaluate_uncertainty", "uncertainty_metrics", "ErrorAccumulator", "UQAccumulator",
    "parity_plot", "calibration_plot", "error_vs_uncertainty_plot", "pyplot", "save_figure",
    "run_stability_suite", "StabilityConfig", "stability_config_from_dict", "stability_verdict",
    # uncertainty
    "UQHead", "UQFitContext", "calibrate", "member_statistics",
    # oracles, exploration, selection
    "CalculatorOracle", "Oracle", "OracleFailure", "OracleTimeout", "LabelResult", "label_safely", "check_label_result",
    "Explorer", "Selector", "Candidate", "Selection", "uncertainty_of", "structure_hash", "min_distance_ratio",
    "unphysical_reason", "UncertaintyFlagger", "read_candidates",
    # tracking and files
    "Tracker", "TrackerCallback", "flatten", "atomic_save", "write_json_atomic", "write_text_atomic", "read_json", "append_durably",
]
