"""Plain-text tables of the sizing tools: one column per network, a ratio for two."""

from __future__ import annotations

from collections.abc import Sequence


def format_bytes(n: int | None) -> str:
  if n is None:
    return '-'
  return f'{n / 2**30:.2f} GiB' if n >= 2**30 else f'{n / 2**20:.1f} MiB'


class Table:
  """A plain-text table, one column per network; for two, a last column of ratios."""

  def __init__(self, names: Sequence[str], ratio_format: str):
    self.ratio = len(names) == 2
    self.ratio_format = ratio_format
    self.rows = [('', *names, *(('ratio',) if self.ratio else ()))]

  def row(self, label, values, fmt, numbers=None) -> None:
    """``fmt`` of each value; the ratio of ``numbers`` (default ``values``; ``[None,
    None]``: no ratio)."""
    cells = (label, *[fmt(v) for v in values])
    if self.ratio:
      a, b = numbers or values
      cells += ('-' if a is None or b is None or not b else format(a / b, self.ratio_format),)
    self.rows.append(cells)

  def render(self) -> str:
    widths = [max(len(r[i]) for r in self.rows) for i in range(len(self.rows[0]))]
    return '\n'.join(
      '  '.join(
        [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True)]
      )
      for r in self.rows
    )
