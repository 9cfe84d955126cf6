"""The one exception type users see: a message that says what is wrong and how to fix it."""


class MpillamaError(Exception):
    """Bad input or an unusable environment. The CLI prints it on one line and exits with code 2."""


class ContextFull(MpillamaError):
    """The prompt (with the conversation kept in the KV cache) needs more positions than --max-seq-len."""
