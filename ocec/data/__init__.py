"""Images in and batches out: reading parquet (a file or a folder), decoding PNG bytes or files into one
uint8 tensor with an on-disk cache, splits, the epoch's sample order (balancing, mixing datasets A and B,
hard-example weights), batched on-device augmentation and the synthetic demo data.

May import: ocec.core.
"""
