"""Values of the trainers' enumerated options, importable without torch (the CLI's ``choices``)."""

OBJECTIVES = ("masked", "supervised")  # PretrainOptions.objective
FINETUNE_MODES = ("head", "last", "full")  # FinetuneOptions.mode


def pretraining_objective(sessions, target: str) -> str:
    """The default pretraining objective for ``sessions``: "supervised" when every one of them has
    the ``target`` series (the cross-day transfer benchmark's winner: a decoder of the pool that
    finetuning starts from), else "masked" (self-supervised; unlabelled recordings)."""
    return "supervised" if sessions and all(target in s.targets for s in sessions) else "masked"
