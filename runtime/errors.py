"""The runtime's errors: all `ZregError`s, so the CLI prints them as one line and exits non-zero.

    ZregError (zreg.registry.errors)
    └── RuntimeFailure        the runtime cannot do what was asked
        ├── BadRequest        bad generation input: size, steps, prompt, noise (exit code 2)
        ├── UnsupportedModel  not an image model, or an architecture/config the runtime does not run
        ├── WeightMismatch    stored tensors missing, extra or mis-shaped against the model's config
        └── NotEnoughMemory   the request's estimated peak does not fit the device (the message has
                              the numbers and the options)
"""

from zreg.registry.errors import ZregError


class RuntimeFailure(ZregError):
    pass


class BadRequest(RuntimeFailure):
    """`param` names the request field at fault (prompt, width, height, steps, guidance,
    negative, noise), so the image API can say which one without reading the message."""

    exit_code = 2

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class UnsupportedModel(RuntimeFailure):
    pass


class WeightMismatch(RuntimeFailure):
    pass


class NotEnoughMemory(RuntimeFailure):
    exit_code = 3
