"""Evaluation and the lab around it: what measures the tokenizer, never what it is made of.

* :mod:`~v2flow.eval.evaluation`: a tokenizer on a data set -> PSNR, SSIM, MS-SSIM, FD/KID and vocabulary
  statistics (``v2flow evaluate``).
* :mod:`~v2flow.eval.classifier`: the MNIST digit classifier, judge of generated digits and FD feature space.
* :mod:`~v2flow.eval.baseline`: the diffusers ``VQModel`` baseline tokenizer and its training.
* :mod:`~v2flow.eval.flops`: model FLOPs and model FLOPs utilisation.
* :mod:`~v2flow.eval.speed`, :mod:`~v2flow.eval.prefix`, :mod:`~v2flow.eval.ordered_sweep`,
  :mod:`~v2flow.eval.head_to_head`: the measures behind the scripts in ``benchmarks/``.
* :mod:`~v2flow.eval.reliability`, :mod:`~v2flow.eval.fuzz_cases`: exact resume, DDP agreement, bad-input fuzzing.
* :mod:`~v2flow.eval.token_information`: what a tokenizer's ids carry, by a regression decoder trained on them.
* :mod:`~v2flow.eval.report`: JSON results merged by key and markdown report sections replaced in place.

Layering: this package may import everything else in ``v2flow``; nothing else in ``v2flow`` imports it
(the command line, :mod:`v2flow.cli`, sits above it). The package imports none of its submodules: import the one
you use.
"""
