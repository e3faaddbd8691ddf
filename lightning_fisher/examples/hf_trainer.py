"""A Hugging Face ``Trainer`` fine-tuning run that analyses, applies the map with PEFT and trains.

The program as a ``transformers`` user writes it: all-MiniLM-L6-v2 loaded as an
``AutoModelForSequenceClassification`` (the packaged checkpoint, a new 9-way ``classifier``
head), the real UCI drug reviews (:mod:`lightning_fisher.examples.drug_reviews`, condition
classification) through the model's tokenizer, then

1. :func:`~lightning_fisher.analyze` on dict batches with ``labels``, no ``loss_fn``: the
   model's own ``.loss`` is analysed. The new head is left out (``exclude=["classifier"]``):
   its random weights are trained in full, not adapted;
2. ``peft.get_peft_model`` with the map's ``LoraConfig``; ``task_type="SEQ_CLS"`` puts the head
   in ``modules_to_save``;
3. a few ``transformers.Trainer`` steps, with :class:`~lightning_fisher.integrations.hf_trainer.FisherMapCallback`
   checking the adapters against the map at train start and recording it in the run;
4. ``save_pretrained``: a standard PEFT adapter folder, whose ``adapter_config.json`` carries
   the map's ``rank_pattern``; ``PeftModel.from_pretrained`` on a fresh base loads it back.

Usage::

    python -m lightning_fisher.examples.hf_trainer OUT_DIR [--max-steps 20] [--max-batches 30]

writes ``OUT_DIR/fisher_map.json``, ``OUT_DIR/adapter/`` (the adapter and the head) and
``OUT_DIR/run.json`` (the callback's record and the losses). With the defaults the analysis
stops after about 5 batches (the ranking is stable) and the loss falls from about 2.2 to 1.7;
a minute or two on a CPU. Nothing is downloaded but the drug-review data (once, cached).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from torch import nn

from lightning_fisher.examples.drug_reviews import condition_label_names, condition_labels, load_drug_reviews
from lightning_fisher.examples.minilm_checkpoint import minilm_checkpoint_dir, quiet_transformers
from lightning_fisher.fisher_map.map import FisherMap

if TYPE_CHECKING:
    import peft
    import transformers

    from lightning_fisher.integrations.hf_trainer import FisherMapCallback

__all__ = ["HEAD", "analyze_classifier", "condition_samples", "finetune", "load_classifier", "main", "run"]

#: The head ``AutoModelForSequenceClassification`` adds to BERT models: new, so trained in full.
HEAD = "classifier"


def load_classifier(num_labels: int) -> nn.Module:
    """all-MiniLM-L6-v2 with a new ``num_labels``-way head, from the packaged checkpoint."""
    from transformers import AutoModelForSequenceClassification

    with quiet_transformers():  # the load report would list the new head's weights as missing, as they are
        return AutoModelForSequenceClassification.from_pretrained(str(minilm_checkpoint_dir()), num_labels=num_labels)


def condition_samples(max_length: int = 64) -> tuple[list[dict[str, Any]], list[str]]:
    """The 600 training reviews tokenized, one dict per review with its condition in ``labels``; and the label names."""
    from transformers import AutoTokenizer

    rows = load_drug_reviews("train")
    names = condition_label_names(rows)
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_checkpoint_dir()))
    encoded = tokenizer([r.review for r in rows], truncation=True, max_length=max_length, padding="max_length",
                        return_tensors="pt")
    samples = [
        {**{key: values[i] for key, values in encoded.items()}, "labels": label}
        for i, label in enumerate(condition_labels(rows, names))
    ]
    return samples, names


def analyze_classifier(model: nn.Module, samples: list[dict[str, Any]], out: Path, batch_size: int = 8,
                       max_batches: int = 30) -> FisherMap:
    """Analyse the pretrained layers with the model's own loss and write ``out/fisher_map.json``.

    Args:
        model: the classifier; its weights, ``requires_grad`` flags and mode come back as they were.
        samples: tokenized reviews with ``labels`` (batched in order, the first ``max_batches``).
        out: folder for the map.
        batch_size: samples per batch.
        max_batches: batches at most; the analysis stops earlier once the ranking is stable.
    """
    from torch.utils.data import DataLoader
    from transformers import default_data_collator

    from lightning_fisher import analyze

    batches = DataLoader(samples, batch_size=batch_size, collate_fn=default_data_collator)
    return analyze(model, batches, output=out, exclude=[HEAD], max_batches=max_batches,
                   min_batches=min(5, max_batches), rank=8, rank_min=2, rank_max=32)


def finetune(
    model: nn.Module, fisher_map: FisherMap, samples: list[dict[str, Any]], out: Path, max_steps: int = 20,
    batch_size: int = 8,
) -> tuple["peft.PeftModel", "transformers.Trainer", "FisherMapCallback"]:
    """Apply the map with PEFT, train ``max_steps`` Trainer steps, save the adapter to ``out/adapter``.

    Args:
        model: the analysed classifier (adapters are injected into it).
        fisher_map: its map (written: the callback records its path).
        samples: the training samples.
        out: ``out/adapter`` gets the adapter, ``out/trainer`` is the Trainer's output folder.
        max_steps: Trainer steps.
        batch_size: samples per step.

    Returns:
        The ``PeftModel``, the ``Trainer`` and the :class:`FisherMapCallback` that checked it.
    """
    import peft
    from transformers import Trainer, TrainingArguments

    from lightning_fisher import lora_config_from_fisher_map
    from lightning_fisher.integrations.hf_trainer import FisherMapCallback

    # SEQ_CLS: PEFT puts the head ("classifier") in modules_to_save, trained and saved in full.
    config = lora_config_from_fisher_map(fisher_map, task_type="SEQ_CLS")
    peft_model = peft.get_peft_model(model, config)
    args = TrainingArguments(
        output_dir=str(out / "trainer"), max_steps=max_steps, per_device_train_batch_size=batch_size,
        learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to=[], seed=0, disable_tqdm=True,
    )
    callback = FisherMapCallback(fisher_map)  # at train start: every adapter has the map's rank
    trainer = Trainer(model=peft_model, args=args, train_dataset=samples, callbacks=[callback])
    trainer.train()
    peft_model.save_pretrained(str(out / "adapter"))  # adapter_config.json carries the map's rank_pattern
    return peft_model, trainer, callback


def run(out: Path, max_steps: int = 20, max_batches: int = 30, batch_size: int = 8, max_length: int = 64) -> dict:
    """Analyse, apply the map, train, save; return (and write to ``out/run.json``) what the run did.

    Args:
        out: folder for ``fisher_map.json``, ``adapter/`` and ``run.json``.
        max_steps: Trainer steps.
        max_batches: analysis batches at most (it stops earlier once the ranking is stable).
        batch_size: samples per batch, analysis and training alike.
        max_length: tokens per review.
    """
    samples, names = condition_samples(max_length)
    model = load_classifier(len(names))
    fisher_map = analyze_classifier(model, samples, out, batch_size, max_batches)
    _, trainer, callback = finetune(model, fisher_map, samples, out, max_steps, batch_size)
    record = {
        **callback.record,
        "losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "run.json").write_text(json.dumps(record, indent=2))
    return record


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder for fisher_map.json, adapter/ and run.json")
    parser.add_argument("--max-steps", type=int, default=20, help="Trainer steps")
    parser.add_argument("--max-batches", type=int, default=30, help="analysis batches at most")
    parser.add_argument("--batch-size", type=int, default=8, help="samples per batch")
    parser.add_argument("--max-length", type=int, default=64, help="tokens per review")
    args = parser.parse_args(argv)
    record = run(args.out, args.max_steps, args.max_batches, args.batch_size, args.max_length)
    applied = record["fisher_map"]
    print(f"{applied['modules_adapted']} adapters (ranks {min(applied['ranks'].values())}-"
          f"{max(applied['ranks'].values())}) trained; loss {record['losses'][0]:.4f} -> {record['losses'][-1]:.4f}; "
          f"adapter in {args.out / 'adapter'}")


if __name__ == "__main__":
    main()
