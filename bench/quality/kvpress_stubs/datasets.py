"""Stand-in for `datasets`: kvpress imports it at import time, KVzipPress never uses it."""


def load_dataset(*args: object, **kwargs: object) -> None:
    raise RuntimeError("datasets is not installed in the kvpress peer environment")
