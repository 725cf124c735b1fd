"""Starting from a trained model: choosing and loading `--pretrain` weights with architecture checks
and a report of what was loaded, the zero-shot report, weight EMA, L2-SP, hard-example weights and
pseudo-labels. New ways to adapt a model (distillation, weight averaging) belong here.

May import: ocec.core, ocec.data, ocec.models, ocec.engine.
"""
