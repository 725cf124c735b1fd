"""The commands around training: eval, compare and predict, export (ONNX, safetensors), the Optuna sweep
and the demo.

May import: every layer below (core, data, models, engine, finetune, training); never ocec.cli.
"""
