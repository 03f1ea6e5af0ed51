"""The store, formats, import, quantization and transfer of zreg models.

Errors raised to users are all `ZregError` (see errors.py); the CLI prints their message on
one line and exits non-zero.
"""
