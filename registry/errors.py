"""One exception family. Every message names the file, field or value and what is wrong.

    ZregError
    ├── InvalidName      a model name or tag that breaks the grammar
    ├── ModelNotFound    no manifest for that name
    ├── InvalidModel     a source folder or file that cannot be imported
    ├── StoreError       the store itself is damaged or busy
    └── FormatError      a blob or manifest that does not follow the format
"""


class ZregError(Exception):
    """An error with a message meant for the user."""

    exit_code = 1


class InvalidName(ZregError):
    exit_code = 2


class ModelNotFound(ZregError):
    pass


class InvalidModel(ZregError):
    pass


class StoreError(ZregError):
    pass


class FormatError(ZregError):
    pass
