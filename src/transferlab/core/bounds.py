"""The range a config value must lie in, declared beside its type: `steps: Annotated[int, Bounds(ge=1)]`.

A schema field carries its bounds as data, so the one checker (config.validation) reads the type and the range
from the same declaration, and the configuration reference (scripts/config_reference.py) lists the same range.
It lives in core because settings dataclasses below config (core.settings) declare their ranges too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional


def _number(value: float) -> str:
    """2**32 rather than 4294967296: a power of two that large is read as one."""
    if isinstance(value, int) and value >= 2**16 and value & (value - 1) == 0:
        return f"2**{value.bit_length() - 1}"
    return str(value)


@dataclass(frozen=True)
class Bounds:
    """ge / gt / le / lt: the range; `also`: values accepted outside it (trainer.max_epochs=-1); `noun`: what
    the number is ("a probability"; else an integer / a number by its type); `note`: what the value means, in
    the error line and the reference; `example`: a value to suggest (`e.g. key=example`)."""

    ge: Optional[float] = None
    gt: Optional[float] = None
    le: Optional[float] = None
    lt: Optional[float] = None
    also: tuple[float, ...] = ()
    noun: str = ""
    note: str = ""
    example: str = ""

    def admits(self, value: Any) -> bool:
        """A number (not a bool) inside the range, or one of `also`."""
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if value in self.also:
            return True
        return (
            (self.ge is None or value >= self.ge)
            and (self.gt is None or value > self.gt)
            and (self.le is None or value <= self.le)
            and (self.lt is None or value < self.lt)
        )

    def range(self) -> str:
        """`in [0, 1)`, `>= 1`, `> 0`: the bounds alone."""
        low = f"[{_number(self.ge)}" if self.ge is not None else f"({_number(self.gt)}" if self.gt is not None else ""
        high = f"{_number(self.le)}]" if self.le is not None else f"{_number(self.lt)})" if self.lt is not None else ""
        if low and high:
            return f"in {low}, {high}"
        if low:
            return (">= " if low[0] == "[" else "> ") + low[1:]
        return ("<= " if high[-1] == "]" else "< ") + high[:-1]

    def summary(self, alternatives: tuple[str, ...] = ()) -> str:
        """The range with the values accepted besides it and the note: `>= 1 or -1 (-1: no limit)`."""
        alts = "".join(f" or {a}" for a in (*(_number(v) for v in self.also), *alternatives))
        return f"{self.range()}{alts}" + (f" ({self.note})" if self.note else "")

    def form(self, integer: bool, alternatives: tuple[str, ...] = (), key: str = "") -> str:
        """The expected form in words: `an integer >= 1 or null (null: every usable core)`, `..., e.g. opset=18`."""
        noun = self.noun or ("an integer" if integer else "a number")
        example = f", e.g. {key}={self.example}" if self.example and key else ""
        return f"{noun} {self.summary(alternatives)}{example}"


class Params(dict):
    """Bounds of the parameters of a `_target_` node, whose types come from the class it names:
    `trainer: Annotated[Target, Params(max_epochs=Bounds(ge=1))]`."""


# The ranges several schemas share.
COUNT = Bounds(ge=1)  # an integer >= 1
SEED = Bounds(ge=0, lt=2**32)  # numpy's and torch's seed range
PROBABILITY = Bounds(gt=0, le=1, noun="a probability")
