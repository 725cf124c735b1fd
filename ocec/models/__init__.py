"""The network: CNN backbones, embedding heads, margin heads (none, CosFace, ArcFace) and the import of
the upstream trainer's checkpoints.

May import: ocec.core.
"""
