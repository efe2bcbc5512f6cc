"""Pruning and post-training int8 quantization of CIFAR ResNets.

The library half of the project: models, data, the one training loop and the one
evaluation loop, pruning, quantization and result writing. The launchers in
``jobs/`` and the searches in ``sweeps/`` call into it and never re-implement it.
"""

__version__ = "0.1.0"
