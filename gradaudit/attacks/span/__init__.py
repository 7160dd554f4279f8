"""The `span` attack: tokens recovered from the row space of linear-module weight gradients.

`attack` decides what can leak; `exact/` solves layer-0 query/key/value, `deep/` any other
module with a usable span; `options` holds the numbers. Method and measurements:
docs/span-method.md and docs/span-measurements.md.
"""

from gradaudit.attacks.span.attack import SpanAttack
from gradaudit.attacks.span.options import SpanOptions

__all__ = ["SpanAttack", "SpanOptions"]
