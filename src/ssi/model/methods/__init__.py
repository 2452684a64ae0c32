"""How speech enters the decoder (`method=units | features`, docs/features.md): one object per method behind
the `SpeechMethod` interface, so that neither the training recipe nor generation branches on the method."""

from ssi.model.methods.base import METHOD_FILE, METHODS, MethodError, SpeechMethod, check_method
from ssi.model.methods.select import data_input, from_checkpoint, from_config, needs_extension

__all__ = [
    "METHODS",
    "METHOD_FILE",
    "MethodError",
    "SpeechMethod",
    "check_method",
    "data_input",
    "from_checkpoint",
    "from_config",
    "needs_extension",
]
