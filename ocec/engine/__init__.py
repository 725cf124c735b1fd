"""What every training run is made of, whatever it starts from: the device and AMP runtime, torchrun
process groups, checkpoints (atomic, weights_only-safe), the optimiser with its named parameter groups and
schedules, one epoch's state, BatchNorm statistics, inference over a split, run folders and reporting.

May import: ocec.core, ocec.data, ocec.models.
"""
