"""Weight pruning of LLaVA's linear layers: registry, calibration, operators, in-place pruning, masks, bank."""
from efficientllava.pruning.apply import PolicyError, check_policy, prune_model, pruner_options, sparsity
from efficientllava.pruning.bank import PruningBank
from efficientllava.pruning.calibration import CalibrationError, InputStats, calibrate, calibrated_blocks
from efficientllava.pruning.layers import LayerInfo, find_layers, get_linear, select_from_config, select_layers
from efficientllava.pruning.masks import MaskMismatchError, apply_masks, load_masks, model_identity, save_masks
from efficientllava.pruning.operators import OPERATORS, Target, parse_target, prune_weight

__all__ = [
    "OPERATORS", "CalibrationError", "InputStats", "LayerInfo", "MaskMismatchError", "PolicyError", "PruningBank",
    "Target", "apply_masks", "calibrate", "calibrated_blocks", "check_policy", "find_layers", "get_linear",
    "load_masks", "model_identity", "parse_target", "prune_model", "prune_weight", "pruner_options", "save_masks",
    "select_from_config", "select_layers", "sparsity",
]
