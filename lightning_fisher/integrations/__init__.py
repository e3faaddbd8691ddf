"""Adapters for training loops other than Lightning's: each imports its framework, the core imports none.

- :mod:`~.hf_trainer`: :class:`~.hf_trainer.FisherMapCallback`, a ``transformers.TrainerCallback``
  that checks the adapters against the map at train start and records the map in the run.
"""
