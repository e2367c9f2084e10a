"""The benchmark protocol, ``detkd bench``.

Same data, same schedule and the same seeds for the student baseline and every method; each backbone a suite
pretrains (``detkd pretrain`` on the suite's data) and each teacher is trained once and cached (keyed by everything
that defines it). A run starts once the runs it reads are done: its pretrained backbone, its teacher, and for a
fine-tune row the baseline student of the same seed. Every run is an ordinary ``detkd train``/``distill`` child
process with its own run folder, so an interrupted suite resumes where it stopped (finished runs are skipped,
unfinished ones continue from their ``last.pt``).

Besides accuracy, a separate timing phase measures, in one process and interleaved step by step, the student's
training step, the teacher's forward and each method's distillation step on the same batches, so step-time
ratios are not skewed by whatever else the machine did while the training runs went on.

A method's gain is stated against two baselines: the student trained with the same schedule, and the student
trained for the same wall-clock time (the baseline's iterations times the method's measured step-time ratio,
rounded up to a grid so methods of similar cost share one such baseline).

Outputs, under ``--out``/<suite>: ``runs/`` (every run folder), ``results.json`` (one record per run, the timing
and the aggregated table), ``BENCHMARKS.md`` and PNG plots. ``--render FILE`` rewrites the Markdown from the JSON
without running anything.

The modules, in the order a suite goes through them:

- ``suites.py``: the suites, their pairs and rows (the one file a new benchmark row touches);
- ``plan.py``: the runs a suite makes and their folders;
- ``runner.py``: runs them as child processes (``progress.py`` shows how far they are), then the timing phase;
- ``timing.py``: step times and latency, measured in one process with the trainer's own step;
- ``report.py``: the aggregated table, the goals, BENCHMARKS.md and plots;
- ``curves.py``: the regime study (``--curves``), learning curves at 1x and 2x the schedules;
- ``cli.py``: the ``detkd bench`` command.
"""
