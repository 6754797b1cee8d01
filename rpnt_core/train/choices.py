"""Values of the trainers' enumerated options, importable without torch (the CLI's ``choices``)."""

OBJECTIVES = ("masked", "supervised")  # PretrainOptions.objective
FINETUNE_MODES = ("head", "last", "full")  # FinetuneOptions.mode
