"""The schemas of the result tables (see ``compress.results`` for the layout)."""

from __future__ import annotations

import pyarrow as pa

from compress.results import make_schema
from jobs.specs import PruneSpec, PTQSpec, TrainSpec

SEARCH_COLUMNS = {"search_id": pa.string(), "trial_id": pa.string()}
# what built the row's model and what data it saw (``ImageData.describe``, ``compress.registry.describe``):
# the spec names them, these are what they turned out to be (null in files written before they existed);
# data_mean and data_std are the normalisation inside the model (a built-in's own, else the data's)
MODEL_COLUMNS = {"model_params": pa.int64(), "model_source_sha256": pa.string(), "data_kind": pa.string(),
                 "data_source": pa.string(), "data_classes": pa.int64(), "data_shape": pa.string(),
                 "data_mean": pa.string(), "data_std": pa.string(), "data_streamed": pa.bool_()}

# PREDICTIONS: the predicted class of every test image of the row's final evaluation, in test-set
# order, one uint8 each (10,000 bytes for the full CIFAR-10 test set; ``EvalStats.predictions`` as bytes;
# int16 little-endian, two bytes each, where the data has more than 256 classes, ``data_classes``).
# Null in files written before the column existed. With the test labels they give per-image
# correctness: intervals and paired tests in ``analysis.stats``.

PHASES = make_schema({
    "run_id": pa.string(), "kind": pa.string(), "phase": pa.int64(),
    "target_sparsity": pa.float64(), "sparsity": pa.float64(), "nonzero": pa.int64(), "prunable": pa.int64(),
    "top1": pa.float64(), "test_loss": pa.float64(), "train_loss": pa.float64(), "train_acc": pa.float64(),
    "epochs": pa.int64(), "train_seconds": pa.float64(), "wall_seconds": pa.float64(),
    "predictions": pa.binary(),  # PREDICTIONS
    # a channel-pruned run (null otherwise): MACs of one image and parameters, now and of the dense model
    "macs": pa.int64(), "params": pa.int64(), "dense_macs": pa.int64(), "dense_params": pa.int64(),
    **SEARCH_COLUMNS, **MODEL_COLUMNS,
}, PruneSpec, TrainSpec)

EPOCHS = make_schema({
    "run_id": pa.string(), "kind": pa.string(), "phase": pa.int64(), "epoch": pa.int64(),
    "lr": pa.float64(), "train_loss": pa.float64(), "train_acc": pa.float64(),
    "test_loss": pa.float64(), "top1": pa.float64(), "images_per_second": pa.float64(),
    "seconds": pa.float64(), **SEARCH_COLUMNS, **MODEL_COLUMNS,
}, PruneSpec, TrainSpec)

MODULES = make_schema({
    "run_id": pa.string(), "kind": pa.string(), "module": pa.string(), "type": pa.string(), "params": pa.int64(),
    "nonzero_before": pa.int64(), "nonzero_after": pa.int64(), "removed": pa.int64(),
    "sparsity": pa.float64(), "channels_before": pa.int64(), "channels_after": pa.int64(),  # null: not channels
    **SEARCH_COLUMNS, **MODEL_COLUMNS,
}, PruneSpec, TrainSpec)

# one row per PTQ configuration; FX rows have no alpha/center (null)
PTQ = make_schema({
    "run_id": pa.string(), "kind": pa.string(), "task": pa.string(), "method": pa.string(),
    "observer": pa.string(), "weight_observer": pa.string(), "engine": pa.string(), "activation_bits": pa.int64(),
    "calib_size": pa.int64(), "alpha": pa.float64(), "center": pa.string(),
    "float_top1": pa.float64(), "int8_top1": pa.float64(), "test_images": pa.int64(),
    "float_bytes": pa.int64(), "int8_bytes": pa.int64(), "int8_packed_bytes": pa.int64(), "program_bytes": pa.int64(),
    "sparsity": pa.float64(), "int8_sparsity": pa.float64(),
    "calib_seconds": pa.float64(), "convert_seconds": pa.float64(), "eval_seconds": pa.float64(),
    "predictions": pa.binary(), "float_predictions": pa.binary(),  # PREDICTIONS: the int8 and the float model's
    **SEARCH_COLUMNS, **MODEL_COLUMNS,
}, PTQSpec)
