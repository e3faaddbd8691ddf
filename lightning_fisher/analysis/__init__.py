"""Measuring: what the analysis does to one model on one stream of batches.

* which modules are candidates and their logical shapes (``candidates``), the user's module
  names under wrappers (``module_names``), the model's fingerprint (``fingerprint``);
* per-sample squared gradient norms (``per_sample_norms``), the hooks that feed them during one
  backward (``collector``), running per-module sums in two sample halves (``accumulator``), the
  mean gradient's spectrum and noise floor (``spectrum``);
* when to stop (``stability``), timestep focus for diffusion / flow models (``timesteps``) and
  its time in a noise scheduler's integer steps (``scheduler_steps``);
* one analysis, batch by batch (``session``), the loop without a Trainer (``plain_loop``), sums
  over processes (``processes``), where the map goes and the seeded run (``files``), and the
  public ``analyze()`` that picks the Trainer path or the plain loop (``entry``).

Nothing here imports Lightning (a test checks it); ``lightning_fisher.training`` adapts it.
"""
