"""One exception type for every input the quantizer refuses, so the CLI can print it without a traceback."""


class QuantError(ValueError):
    """Bad input to quantization or evaluation; the message names the problem and the fix."""
