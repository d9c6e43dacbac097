"""Tasks built on training and conversion: ``finetune convert``, the convert recipe pipeline,
``finetune compare`` and the demo.
"""
