"""Stand-in for `fire`: kvpress imports it at import time, KVzipPress never uses it."""


def Fire(*args: object, **kwargs: object) -> None:  # noqa: N802 (the real name)
    raise RuntimeError("fire is not installed in the kvpress peer environment")
