"""Worked examples of the path a user with a trained model takes: a ``package.module:factory`` that
loads a checkpoint from a local folder and hands it over as :class:`autocompress.Task` with its own
DataLoaders, input / target adapters and metric.

* :mod:`.bert_encoder`: a BERT-family encoder (``transformers.BertModel``), dict inputs, token-level
  embeddings scored by fidelity (cosine to the teacher).
* :mod:`.resnet18`: a torchvision-style ResNet-18 on 3x64x64 images, scored by accuracy.
* :mod:`.pretrained`: real pretrained checkpoints on real data (ImageNet MobileNetV2 and
  EfficientNet-Lite0 fine-tuned on MNIST; the all-mpnet-base-v2 sentence encoder on BBC News), read
  from the folder ``benchmarks/real_models.py --setup`` fills; :mod:`.efficientnet_lite` is the
  EfficientNet-Lite0 its checkpoint loads into.

The first two create their checkpoint on first use (deterministic seed) and load it from the folder
afterwards, exactly as a user's checkpoint would be loaded. Nothing downloads.
"""
