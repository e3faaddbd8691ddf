"""Comparing a map with flat LoRA: the arms, each fisher arm with its flat twin of the same
size (``plan``), and the result table, verdicts and frontier (``results``). No Lightning here;
``lightning_fisher.training.compare_runner`` runs the arms."""
