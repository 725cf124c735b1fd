"""`ocec train`: its flags and settings, where a run starts (scratch, --pretrain, --resume), the job
it builds and the epoch loop with warmup, stages, plateau schedule and best-F1 checkpointing.

May import: ocec.core, ocec.data, ocec.models, ocec.engine, ocec.finetune.
"""
