"""Values of the trainers' enumerated options, importable without torch (the CLI's ``choices``)."""

OBJECTIVES = ("masked", "supervised")  # PretrainOptions.objective
FINETUNE_MODES = ("head", "last", "full")  # FinetuneOptions.mode
CHANNEL_MODES = ("resample", "readin")  # PretrainOptions.channels, FinetuneOptions.channels


def pretraining_objective(sessions, target: str) -> str:
    """The default pretraining objective for ``sessions``.

    Args:
        sessions: the sessions to pretrain on.
        target: the behaviour series a supervised run would learn.

    Returns:
        "supervised" when every session has the ``target`` series (the checkpoint is then a
        decoder of the pool that finetuning starts from), else "masked" (self-supervised, for
        unlabelled recordings).
    """
    return "supervised" if sessions and all(target in s.targets for s in sessions) else "masked"
