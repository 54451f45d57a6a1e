"""Integrations with training frameworks, each in its own module and imported from there.

- `advlab.integrations.transformers`: `AdversarialTrainer`, a Hugging Face `Trainer` whose
  training step is an advlab recipe's step (extra: `pip install 'advlab[transformers]'`).
- `advlab.integrations.lightning`: `adversarial_step`, a recipe's step inside a
  `LightningModule.training_step` with manual optimisation (extra: `pip install 'advlab[lightning]'`).

Nothing is imported here, so `import advlab` never needs these optional packages.
"""
