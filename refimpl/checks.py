"""Argument checks shared by the whole package: one message for one mistake.

``check_int("batch_size", v)`` returns ``int(v)`` or raises ValueError with
the argument's name and value. Python bools are refused (``True`` is an int
to Python, never a size to a user), and so are floats, even integral ones:
a float where a count is expected is almost always a bug upstream.
"""
import numbers


def check_int(name, value, minimum=1, maximum=None):
    """``int(value)`` if it is an integer in [minimum, maximum], else ValueError.

    minimum: the smallest allowed value (1: "a positive integer"; 0: "a
    non-negative integer"); maximum: None (no upper bound) or the largest.
    NumPy integers are accepted.
    """
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if ok and value >= minimum and (maximum is None or value <= maximum):
        return int(value)
    if maximum is not None:
        what = f"an integer in [{minimum}, {maximum}]"
    elif minimum == 1:
        what = "a positive integer"
    elif minimum == 0:
        what = "a non-negative integer"
    else:
        what = f"an integer >= {minimum}"
    raise ValueError(f"{name} must be {what}, got {value!r}")
