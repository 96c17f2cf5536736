"""The trainer behind `experiments.train` and `experiments.compare`.

models       config -> strategy and staged model
optim        config -> optimizer: learning-rate schedule, weight-decay mask
datasets     config -> data splits and training augmentation
builders     config -> compiled program (model, executor, eval step, mesh), cached
checkpoints  Orbax checkpoints with a compatibility fingerprint; workdir checks
cli          flag parsing with one-line errors (unknown --config.FIELD, bad config arg)
distributed  multi-process start-up flags (jax.distributed.initialize)
loop         the trainer's hot loop: non-finite checks on device, batches placed ahead
metrics      JSONL + TensorBoard writer, evaluation over a split
trainer      `train_and_evaluate(config, workdir)`: one run, resumable
report       `compare(config, workdir)`: strategies x seeds, aggregated and predicted
report_files what a comparison writes: results.md, the CSVs, the figures
"""
