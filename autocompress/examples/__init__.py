"""Worked examples of the path a user with a trained model takes: a ``package.module:factory`` that
loads a checkpoint from a local folder and hands it over as :class:`autocompress.Task` with its own
DataLoaders, input / target adapters and metric.

* :mod:`.bert_encoder`: a BERT-family encoder (``transformers.BertModel``), dict inputs, token-level
  embeddings scored by fidelity (cosine to the teacher).
* :mod:`.resnet18`: a torchvision-style ResNet-18 on 3x64x64 images, scored by accuracy.

Each creates its checkpoint on first use (deterministic seed) and loads it from the folder
afterwards, exactly as a user's checkpoint would be loaded. Nothing downloads.
"""
